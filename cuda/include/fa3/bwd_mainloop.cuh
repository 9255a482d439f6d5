// Backward mainloop pieces (KERNELS.md §4.1): the SS WGMMA issue helper and the elementwise step that turns the
// S and dP accumulators into P and dS.
#pragma once

#include <cmath>

#include "cute/tensor.hpp"

namespace fa3 {
namespace bwd {

// Issues one SS GEMM over all k-slices as a single WGMMA batch (no wait). kZeroInit: the first k-slice overwrites
// the accumulator (scale-out 0) instead of clearing registers (KERNELS.md §2 v1).
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
CUTE_DEVICE void gemm_ss(TiledMma& mma, TA const& a, TB const& b, TC& c) {
  using namespace cute;
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
}

CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// s (in: Q K^T, out: P) and dp (in: dO V^T, out: dS without the softmax scale), as (rows, cols) views; coords: the
// tile coordinates of the same registers. lse_log2 / dsum: the values of the view's rows, already in registers (the
// caller loads them before waiting for the S/dP GEMMs, so their global latency hides under the tensor work).
//   P  = exp2(x - lse*log2e),  x = s*scale*log2e, or with softcap t = tanh(s*scale/cap), x = t*cap*log2e
//   dS = P * (dP - D) * (softcap ? 1 - t^2 : 1)
// Masked entries get P = dS = 0 by a select (their exp2 may overflow for rows whose lse was -inf).
template <bool kMask, bool kSoftcap, class TS, class TdP, class TC>
CUTE_DEVICE void scores_to_grads(TS& s, TdP& dp, TC const& coords, const float* lse_log2, const float* dsum, int row0,
                                 int col0, int seqlen_k, int win_lo, int win_hi, float scale_log2, float softcap_pre) {
  using namespace cute;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(s); ++mi) {
    const float lse = lse_log2[mi];
    const float d = dsum[mi];
    // Visible columns of this row, relative to the tile origin.
    const int i = row0 + get<0>(coords(mi, 0));
    const int lo = i + win_lo - col0;
    const int hi = min(i + win_hi, seqlen_k - 1) - col0;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) {
      float x = s(mi, ni);
      float dfac = 1.f;
      if constexpr (kSoftcap) {
        const float t = tanh_approx(x * softcap_pre);
        x = t * scale_log2;
        dfac = 1.f - t * t;
      } else {
        x = x * scale_log2;
      }
      float p = exp2f(x - lse);
      if constexpr (kMask) {
        const int j = get<1>(coords(mi, ni));
        p = (j < lo || j > hi) ? 0.f : p;
      }
      s(mi, ni) = p;
      dp(mi, ni) = kSoftcap ? p * (dp(mi, ni) - d) * dfac : p * (dp(mi, ni) - d);
    }
  }
}

}  // namespace bwd
}  // namespace fa3

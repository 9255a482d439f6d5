// The backward's elementwise step (docs/kernels.md §3.5): the S and dP accumulators of a tile become P and dS,
// the derivative of the softmax (and of softcap) applied in registers.
#pragma once

#include <cmath>

#include "cute/tensor.hpp"

#include "fa3/softcap.cuh"
#include "fa3/visibility.h"

namespace fa3 {
namespace bwd {

// Row statistics (lse, D) sit in SMEM, but their address reaches the elementwise code through the aligned cast of
// the dynamic SMEM base, which hides the state space: plain dereferences compile to generic loads. Explicit
// ld.shared keeps them on the shared path.
CUTE_DEVICE float load_shared(const float* p) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))));
  return v;
}
CUTE_DEVICE float2 load_shared2(const float* p) {  // p 8-byte aligned
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
               : "=f"(v.x), "=f"(v.y)
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))));
  return v;
}

// s (in: scores, out: P) and dp (in: dP, out: dS without the softmax scale), as (rows, cols) views of the S / dP
// accumulators; coords: the tile coordinates of the same registers. Rows are queries and columns keys, or the
// reverse when kTransposed (S^T, dP^T of the RS form). lse_log2 / dsum: the M-block's per-query values in SMEM.
// q0 / k0: the tile's first query / key.
//   P  = exp2(x - lse*log2e),  x = s*scale*log2e, or with softcap t = tanh(s*scale/cap), x = t*cap*log2e
//   dS = P * (dP - D) * (softcap ? 1 - t^2 : 1)
// Masked entries (pairs vis does not let see each other) get P = dS = 0 by a select (their exp2 may overflow for rows
// whose lse was -inf).
template <bool kMask, bool kSoftcap, bool kTransposed, class TS, class TdP, class TC>
CUTE_DEVICE void scores_to_grads(TS& s, TdP& dp, TC const& coords, const float* lse_log2, const float* dsum, int q0,
                                 int k0, Visibility const& vis, float scale_log2, float softcap_pre) {
  using namespace cute;
  constexpr int kRows = decltype(size<0>(s))::value, kCols = decltype(size<1>(s))::value;
  // Visible columns of each row, relative to the tile origin: an interval, so the mask is two compares per entry.
  int lo[kRows], hi[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = get<0>(coords(mi, 0));
    if constexpr (kTransposed) {  // row = key k0 + r, columns = queries q0 + c
      lo[mi] = vis.first_query(k0 + r) - q0;
      hi[mi] = vis.last_query(k0 + r) - q0;
    } else {                      // row = query q0 + r, columns = keys k0 + c
      lo[mi] = vis.first_key(q0 + r) - k0;
      hi[mi] = vis.last_key(q0 + r) - k0;
    }
  }
  auto entry = [&](int mi, int ni, float lse_q, float d_q) {
    const int c = get<1>(coords(mi, ni));
    float x = s(mi, ni);
    float dfac = 1.f;
    if constexpr (kSoftcap) {
      const float t = tanh_approx(x * softcap_pre);
      x = t * scale_log2;
      dfac = 1.f - t * t;
    } else {
      x = x * scale_log2;
    }
    float p = exp2f(x - lse_q);
    if constexpr (kMask) p = (c < lo[mi] || c > hi[mi]) ? 0.f : p;
    s(mi, ni) = p;
    dp(mi, ni) = kSoftcap ? p * (dp(mi, ni) - d_q) * dfac : p * (dp(mi, ni) - d_q);
  };
  if constexpr (kTransposed) {
    // Walk along the columns (queries) in the outer loop, so each query's lse and D are loaded once and die right
    // after use (keeping all of a transposed tile's 2 x 16 values live costs ~100 B of spills at d=128). A thread
    // holds its columns in adjacent pairs (the WGMMA accumulator layout), so the pair's statistics are one 8-byte
    // load each.
    static_assert(kCols % 2 == 0, "WGMMA accumulators hold column pairs");
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ni += 2) {
      const int q = get<1>(coords(0, ni));
      const float2 lse_q = load_shared2(lse_log2 + q), d_q = load_shared2(dsum + q);
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        entry(mi, ni, lse_q.x, d_q.x);
        entry(mi, ni + 1, lse_q.y, d_q.y);
      }
    }
  } else {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int q = get<0>(coords(mi, 0));
      const float lse_q = load_shared(lse_log2 + q), d_q = load_shared(dsum + q);
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) entry(mi, ni, lse_q, d_q);
    }
  }
}

}  // namespace bwd
}  // namespace fa3

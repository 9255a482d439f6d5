// Online softmax over WGMMA accumulator rows (docs/kernels.md §2.4, §4.4, §5).
//
// A row of a 64xN accumulator lives in a quad of 4 threads: the row max needs two butterfly shuffles, the row sum is
// kept per thread and reduced once at the end. Scores are used in the exp2 domain with one folded constant
// (scale * log2 e, or softcap * log2 e after the tanh), so each element costs one FFMA and one MUFU.EX2.
// Requires a positive effective scale (softmax_scale > 0, softcap >= 0).
#pragma once

#include <cmath>

#include "cute/tensor.hpp"

namespace fa3 {

CUTE_DEVICE float quad_allreduce_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return x;
}
CUTE_DEVICE float quad_allreduce_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x;
}
template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // per-thread partial; quad-reduced in finalize()
  float scale_log2;

  CUTE_DEVICE explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // s: (rows, cols) view of the score fragment, overwritten with unnormalised probabilities. rescale[r] is the
  // factor the caller applies to row r of O. A row that has seen only -inf keeps max -inf, gets p = 0 and
  // rescale 0 (the max is replaced by 0 in the exponent so that -inf - -inf never forms a NaN, docs/kernels.md
  // §4.4).
  template <class TensorS>
  CUTE_DEVICE void update(TensorS& s, float (&rescale)[kRows]) {
    using namespace cute;
    static_assert(decltype(size<0>(s))::value == kRows);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) m = fmaxf(m, s(r, c));
      m = quad_allreduce_max(m);
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      rescale[r] = exp2f(row_max[r] * scale_log2 - m_scaled);  // 0 while the old max is -inf
      row_max[r] = m;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        const float p = exp2f(fmaf(s(r, c), scale_log2, -m_scaled));
        s(r, c) = p;
        sum += p;
      }
      row_sum[r] = fmaf(row_sum[r], rescale[r], sum);
    }
  }

  // inv_sum[r] multiplies row r of O; lse2[r] is the natural-log LSE. Empty rows (sum 0) give O = 0, LSE = -inf.
  CUTE_DEVICE void finalize(float (&inv_sum)[kRows], float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_allreduce_sum(row_sum[r]);
      const bool empty = !(sum > 0.f);  // also catches NaN
      inv_sum[r] = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : (row_max[r] * scale_log2 + __log2f(sum)) * 0.69314718055994530942f;
    }
  }
};

}  // namespace fa3

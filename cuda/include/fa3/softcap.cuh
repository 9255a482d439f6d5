// Logit softcapping, s -> c * tanh(s * scale / c), as both directions compute it (docs/kernels.md §5): the forward
// bends its scores with apply_softcap, the backward recomputes the same tanh for P and its derivative. The factor c
// is folded into the exp2 scale, so only tanh(s * scale / c) is computed here.
#pragma once

#include "cute/tensor.hpp"

namespace fa3 {

// One special-function instruction (MUFU.TANH), the unit that also runs the softmax's exponentials.
CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// s -> tanh(s * pre_scale), pre_scale = scale / c. Apply BEFORE masking, or masked -inf would become -c.
template <class Tensor>
CUTE_DEVICE void apply_softcap(Tensor& s, float pre_scale) {
  CUTE_UNROLL
  for (int i = 0; i < cute::size(s); ++i) s(i) = tanh_approx(s(i) * pre_scale);
}

}  // namespace fa3

// Issuing one tiled WGMMA over all k-slices, shared by the forward and backward mainloops (docs/kernels.md §2.3).
#pragma once

#include <type_traits>

#include "cute/tensor.hpp"

namespace fa3 {

// Issues C (+)= A B over all k-slices as one WGMMA batch and commits it (no wait): SS, or RS when `a` is a register
// fragment. kZeroInit: the first k-slice overwrites the accumulator (scale-out 0) instead of clearing registers. The
// accumulator, and a register A operand, are fenced: their registers must stay untouched until the matching
// warpgroup_wait, after which the caller fences them again where it reuses them.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
CUTE_DEVICE void wgmma_gemm(TiledMma& mma, TA&& a, TB const& b, TC& c) {
  using namespace cute;
  static_assert(std::is_same_v<typename TB::iterator, GMMA::DescriptorIterator>, "B is always an SMEM descriptor");
  constexpr bool kRegA = !std::is_same_v<typename std::decay_t<TA>::iterator, GMMA::DescriptorIterator>;
  if constexpr (kRegA) warpgroup_fence_operand(a);
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
  if constexpr (kRegA) warpgroup_fence_operand(a);
}

}  // namespace fa3

// Register-fragment views of WGMMA accumulators (docs/kernels.md §2.3).
//
// A 64xN FP32 accumulator fragment has layout ((2,2,N/8), MMA_M, MMA_N): (column pair, row r / r+8, 8-column
// group). Two consecutive 8-column groups hold exactly the registers of one k16 slice of a register-A WGMMA operand
// ((2,2,2), MMA_M, MMA_K), in the same order, so converting S to 16 bits gives P's A fragment without shuffles.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/array.h"
#include "cutlass/numeric_conversion.h"

namespace fa3 {

// ((2,2,V),M,N) -> ((2,M),(2,V,N)): rows x columns of the thread's part of the tile.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout const& l) {
  using namespace cute;
  static_assert(rank(Layout{}) == 3 && rank<0>(Layout{}) == 3, "expected a WGMMA accumulator layout");
  auto l0 = get<0>(l);
  return make_layout(make_layout(get<1>(l0), get<1>(l)), make_layout(get<0>(l0), get<2>(l0), get<2>(l)));
}

// ((2,2,V),M,N) -> ((2,2,2),M,(V/2,N)): the register-A operand view of the same registers.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(Layout const& l) {
  using namespace cute;
  static_assert(size<0, 2>(Layout{}) % 2 == 0, "accumulator N must be a multiple of 16");
  auto l0 = get<0>(l);
  auto v = logical_divide(get<2>(l0), Int<2>{});
  return make_layout(make_layout(get<0>(l0), get<1>(l0), get<0>(v)), get<1>(l), make_layout(get<1>(v), get<2>(l)));
}

template <class Element, class Engine, class Layout>
CUTE_DEVICE auto convert_fragment(cute::Tensor<Engine, Layout> const& src) {
  using namespace cute;
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(src))::value;
  cutlass::NumericArrayConverter<Element, From, N> conv;
  auto out = conv(*reinterpret_cast<cutlass::Array<From, N> const*>(src.data()));
  Tensor dst = make_tensor<Element>(src.layout());
  *reinterpret_cast<cutlass::Array<Element, N>*>(dst.data()) = out;
  return dst;
}

}  // namespace fa3

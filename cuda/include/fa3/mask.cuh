// Element masking of a score fragment for boundary blocks (docs/kernels.md §4.3). Only masked iterations call
// this; the mask-free body never touches indices.
#pragma once

#include <cmath>

#include "cute/tensor.hpp"

#include "fa3/visibility.h"

namespace fa3 {

// s, coords: (rows, cols) views of the score fragment and of its tile coordinates (an identity tensor partitioned
// like the accumulator). row0/col0: global row/column of the tile origin. Row i keeps the keys vis lets it see.
template <class TensorS, class TensorC>
CUTE_DEVICE void apply_mask(TensorS& s, TensorC const& coords, int row0, int col0, Visibility const& vis) {
  using namespace cute;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    const int i = row0 + get<0>(coords(r, 0));
    // Column limits relative to the tile origin, so the inner loop compares compile-time-ish column offsets.
    const int lo = vis.first_key(i) - col0;
    const int hi = vis.last_key(i) - col0;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) {
      const int j = get<1>(coords(r, c));
      if (j < lo || j > hi) s(r, c) = -INFINITY;
    }
  }
}

}  // namespace fa3

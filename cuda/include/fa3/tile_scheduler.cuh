// Tile order of the forward grid (KERNELS.md §2 v5, §7 E3): which (m-block, head, batch) tiles a CTA computes.
//
// Non-persistent grid (one CTA per tile, d >= 192): tile idx = blockIdx.x; the m-blocks of one head are adjacent, so
// CTAs running together share K/V in L2, and run last-to-first, so with causal masks the longest tiles start first
// and the hardware's greedy dispatch fills the tail with short ones.
//
// Persistent grid (one CTA per SM, d <= 128): the work items are pairs of m-blocks of one head, {M-1-j, j}. Under a
// causal mask a tile's cost grows linearly with its m-block, so every pair costs about the same, and the static
// strided assignment (CTA c takes pairs c, c + gridDim.x, ...) is balanced without a counter or workspace. Pairs of
// one head are adjacent, which keeps the CTAs running together on one or two heads' K/V (L2 reuse).
// Measured (H200, benchmarks/NOTES_fwd.md v5): striding over single tiles instead was 11 % (LPT order within L2
// groups of heads) and 31 % (the per-head order above) slower than the non-persistent grid on causal 16k.
#pragma once

#include "cute/config.hpp"

namespace fa3 {

struct FwdTileScheduler {
  struct Tile {
    int m_block, head, batch;
  };
  int num_m_blocks;
  int heads;
  int num_hb;  // heads * batch

  // Work items: pairs of m-blocks with the persistent grid (the middle m-block of an odd count is alone), tiles
  // otherwise; the grid never needs more CTAs than this.
  template <bool kPersistent>
  CUTE_HOST_DEVICE long long num_items() const {
    const int per_head = kPersistent ? (num_m_blocks + 1) / 2 : num_m_blocks;
    return (long long)per_head * num_hb;
  }

  // Calls f(Tile) for each of this CTA's tiles, in order.
  template <bool kPersistent, class F>
  CUTE_DEVICE void for_each_tile(F&& f) const {
    if constexpr (kPersistent) {
      const int pairs_per_head = (num_m_blocks + 1) / 2;
      const int num_pairs = int(num_items<true>());
      for (int idx = blockIdx.x; idx < num_pairs; idx += gridDim.x) {
        const int hb = idx / pairs_per_head;
        const int j = idx - hb * pairs_per_head;
        const int last = num_m_blocks - 1 - j;
        // One call site, so that f (the whole mainloop) is inlined: a call would split the WGMMA pipeline (C7510).
        const int count = last == j ? 1 : 2;
        for (int t = 0; t < count; ++t) f(make_tile(t == 0 ? last : j, hb));
      }
    } else {
      const int idx = blockIdx.x;
      const int hb = idx / num_m_blocks;
      f(make_tile(num_m_blocks - 1 - (idx - hb * num_m_blocks), hb));
    }
  }

  CUTE_DEVICE Tile make_tile(int m_block, int hb) const { return Tile{m_block, hb % heads, hb / heads}; }
};

}  // namespace fa3

// Tile order of the forward grid (docs/kernels.md §2.9): which (m-block, head, batch) tiles a CTA computes.
//
// Non-persistent grid (one CTA per tile, d >= 192): tile idx = blockIdx.x; the m-blocks of one head are adjacent, so
// CTAs running together share K/V in L2, and run last-to-first, so with causal masks the longest tiles start first
// and the hardware's greedy dispatch fills the tail with short ones.
//
// Persistent grid (one CTA per SM, d <= 128): CTA c takes work items c, c + gridDim.x, ... (static, no counter or
// workspace); the items of one head are adjacent, which keeps the CTAs running together on a few heads' K/V (L2
// reuse). What an item is depends on how tile costs vary along the sequence (the host decides, fwd_launch.cuh):
//  - Costs that differ between the first and the last m-block (causal: a tile's cost grows linearly with its
//    m-block): pairs of m-blocks of one head, {M-1-j, j}, every pair costing about the same (the middle m-block of an
//    odd count is alone). Measured (H200, benchmarks/NOTES_fwd.md v5): striding over single tiles instead was 11 %
//    (LPT order within L2 groups of heads) and 31 % (the per-head order above) slower than the non-persistent grid on
//    causal 16k.
//  - Equal costs (no mask; windows narrower than the sequence): the tiles in flat order (head by head, last m-block
//    first), two consecutive ones per item for as many whole rounds of CTAs as fit, then one per item, so that no
//    CTA runs more than ceil(tiles / CTAs). The two tiles of an item are mostly of one head (the second finds its
//    K / V in L2; single-tile items throughout measured -1..-3 % at 1k-4k, H100). Pairs {M-1-j, j} here cut the work
//    coarser, and an odd m-block count leaves lone middle tiles: with the 192-row tile at 2k queries (11 m-blocks,
//    6 pairs per head, 132 SMs) whole CTAs got only lone tiles while the busiest ran 24 tiles against a mean of 21.3
//    (NOTES_fwd.md v8: +10 % at that cell).
#pragma once

#include "cute/config.hpp"

namespace fa3 {

struct FwdTileScheduler {
  struct Tile {
    int m_block, head, batch;
  };
  int num_m_blocks;
  int heads;
  int num_hb;        // heads * batch
  bool pair_blocks;  // persistent grid: items are pairs {M-1-j, j} of one head (else flat tiles, see make)
  int ctas;          // grid size
  int items;         // persistent grid: work items; CTA c takes c, c + ctas, ...
  int divisor;       // pairs: items per head; else m-blocks per head (flat tile index -> head)
  int doubled;       // flat tiles: items [0, doubled) hold two consecutive tiles, the rest one

  // Host: the schedule of num_m_blocks x heads x batch tiles (see above; pair_blocks: the tile costs differ along
  // the sequence) on at most num_sms CTAs.
  static FwdTileScheduler make(int num_m_blocks, int heads, int batch, bool pair_blocks, bool persistent,
                               int num_sms) {
    FwdTileScheduler s{num_m_blocks, heads, heads * batch, pair_blocks, 0, 0, 0, 0};
    const int tiles = num_m_blocks * s.num_hb;  // < 2^31: checked by the caller
    if (!persistent) {
      s.ctas = s.items = tiles;
    } else if (pair_blocks) {
      s.divisor = (num_m_blocks + 1) / 2;
      s.items = s.divisor * s.num_hb;
      s.ctas = s.items < num_sms ? s.items : num_sms;
    } else {
      s.divisor = num_m_blocks;
      s.ctas = tiles < num_sms ? tiles : num_sms;
      s.doubled = tiles / (2 * s.ctas) * s.ctas;
      s.items = tiles - s.doubled;
    }
    return s;
  }

  // Calls f(Tile) for each of this CTA's tiles, in order.
  template <bool kPersistent, class F>
  CUTE_DEVICE void for_each_tile(F&& f) const {
    if constexpr (kPersistent) {
      for (int idx = blockIdx.x; idx < items; idx += gridDim.x) {
        // Pairs: pos = the pair's index (head * batch, j) in a grid of `divisor` pairs per head. Flat tiles: pos = the
        // first tile's flat index; the second is pos + 1 (the next head's last m-block after m-block 0).
        const int pos = pair_blocks ? idx : (idx < doubled ? 2 * idx : idx + doubled);
        const int count = pair_blocks ? (2 * (idx % divisor) + 1 == num_m_blocks ? 1 : 2) : (idx < doubled ? 2 : 1);
        // One call site, so that f (the whole mainloop) is inlined: a call would split the WGMMA pipeline (C7510).
        for (int t = 0; t < count; ++t) {
          const int p = pair_blocks ? pos : pos + t;
          const int hb = p / divisor;
          const int r = p - hb * divisor;
          f(make_tile(pair_blocks && t == 1 ? r : num_m_blocks - 1 - r, hb));
        }
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

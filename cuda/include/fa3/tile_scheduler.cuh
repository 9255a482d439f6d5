// Tile order of the (non-persistent) forward grid: one CTA per (m-block, head, batch).
//
// The grid is 1-D (no 65535 limit on batch or heads). m-blocks of one head are adjacent so that they share K/V in
// L2, and run last-to-first: with causal masks the last m-blocks have the most KV blocks, so the longest tiles start
// first (the LPT idea of KERNELS.md §2 v5 without the persistent grid).
#pragma once

#include "cute/config.hpp"

namespace fa3 {

struct SingleTileScheduler {
  struct Tile {
    int m_block, head, batch;
  };
  static long long num_ctas(int num_m_blocks, int heads, int batch) {
    return (long long)num_m_blocks * heads * batch;
  }
  CUTE_DEVICE static Tile get(int num_m_blocks, int heads) {
    const int idx = blockIdx.x;
    const int m = idx % num_m_blocks;
    const int hb = idx / num_m_blocks;
    return Tile{num_m_blocks - 1 - m, hb % heads, hb / heads};
  }
};

}  // namespace fa3

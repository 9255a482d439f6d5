// Tile order of the forward grid (docs/kernels.md §2.9): which (m-block, head, batch, split) tiles a CTA computes.
// With split-KV (fa3/split_kv.h) every (m-block, head, batch) has num_splits tiles; below, a "head" of the order
// is a (head, split) pair, the heads of one split adjacent, so that the query heads sharing a KV head (GQA) read
// the same key chunk at about the same time (L2 reuse).
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
//
// Persistent grid, sequences of their own lengths (kVarlen): the work list holds only the tiles of existing rows,
// sequence by sequence (each with its own m-block count, read on the device), head by head, as pairs {M-1-j, j} or
// single tiles by the rule above, costliest sequences (by class) first. A grid over (m-blocks of the longest
// sequence, head, sequence) would hand most CTAs empty tiles of short sequences and give the long sequence's tiles
// to a few. Items cost what their sequence's length makes them, so they are handed out dynamically: CTA c starts with
// item c and then takes the next value of a counter in the workspace. The producer's walking warp publishes each
// tile to the consumers through a TileRing in SMEM (docs/kernels.md §2.9).
#pragma once

#include "cute/config.hpp"
#include "cutlass/arch/barrier.h"

#include "fa3/pipeline.cuh"
#include "fa3/sequences.h"

namespace fa3 {

// The dynamic walk's tiles, from the producer's walking warp to the consumer warps, in SMEM: two slots, each with a
// full barrier (one arrival: the publishing lane) and an empty one (one arrival per consumer thread: each thread's
// read of a slot is ordered before its refill by the barrier alone; a tile costs hundreds of cycles, the arrivals a
// few).
struct TileRing {
  static constexpr int kSlots = 2;
  int4 slot[kSlots];  // (m_block, head, batch, split); m_block < 0: the walk has ended
  uint64_t full[kSlots];
  uint64_t empty[kSlots];

  CUTE_DEVICE void init(int consumer_threads) {
    for (int s = 0; s < kSlots; ++s) {
      cutlass::arch::ClusterBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], consumer_threads);
    }
  }
  // One lane: waits until the consumers have read the slot's previous tile, then fills it.
  CUTE_DEVICE void publish(PipeState<kSlots>& st, int m_block, int head, int batch, int split) {
    cutlass::arch::ClusterBarrier::wait(&empty[st.index], st.phase ^ 1u);
    slot[st.index] = make_int4(m_block, head, batch, split);
    cutlass::arch::ClusterBarrier::arrive(&full[st.index]);
    st.advance();
  }
  // Every consumer thread.
  CUTE_DEVICE int4 take(PipeState<kSlots>& st) {
    cutlass::arch::ClusterBarrier::wait(&full[st.index], st.phase);
    const int4 t = slot[st.index];
    cutlass::arch::ClusterBarrier::arrive(&empty[st.index]);
    st.advance();
    return t;
  }
};

struct FwdTileScheduler {
  struct Tile {
    int m_block, head, batch, split;
  };
  // Which side of the kernel walks: the producer finds the tiles, the consumers follow (the same walk, or with the
  // dynamic walk the tiles the producer publishes).
  enum class Role { kProducer, kConsumer };
  int num_m_blocks;
  int heads;
  int splits;        // num_splits (1 without split-KV)
  int num_hb;        // heads * splits * batch: the tiles of one m-block
  bool pair_blocks;  // persistent grid: items are pairs {M-1-j, j} of one head (else flat tiles, see make)
  int ctas;          // grid size
  int items;         // persistent grid: work items; CTA c takes c, c + ctas, ...
  int divisor;       // pairs: items per head; else m-blocks per head (flat tile index -> head)
  int doubled;       // flat tiles: items [0, doubled) hold two consecutive tiles, the rest one
  int* counter;      // persistent grid with kVarlen: items handed out so far beyond the first gridDim.x (zeroed
                     // before the launch)

  // Host: the schedule of num_m_blocks x heads x splits x batch tiles (see above; pair_blocks: the tile costs differ
  // along the sequence) on at most num_sms CTAs.
  static FwdTileScheduler make(int num_m_blocks, int heads, int splits, int batch, bool pair_blocks, bool persistent,
                               int num_sms) {
    FwdTileScheduler s{num_m_blocks, heads, splits, heads * splits * batch, pair_blocks, 0, 0, 0, 0, nullptr};
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

  // Calls f(Tile) for each of this CTA's tiles, in order; the consumers see the producer's order. With kVarlen and
  // the persistent grid every lane of the producer's walking warp must call it (the walk reads the sequences'
  // lengths a warp at a time), and ring is where the tiles pass.
  template <bool kPersistent, bool kVarlen, int kBlockM, int kBlockN, Role kRole, class F>
  CUTE_DEVICE void for_each_tile(Sequences const& seqs, TileRing& ring, F&& f) const {
    if constexpr (kPersistent && kVarlen && kRole == Role::kConsumer) {
      PipeState<TileRing::kSlots> st;
      for (int4 t = ring.take(st); t.x >= 0; t = ring.take(st)) f(Tile{t.x, t.y, t.z, t.w});
    } else if constexpr (kPersistent && kVarlen) {
      const bool lane0 = threadIdx.x % 32 == 0;
      PipeState<TileRing::kSlots> st;
      PackedWalk walk;
      int idx = blockIdx.x;
      for (;;) {
        // Fetched one item ahead, so the atomic's latency hides behind this item's tiles.
        int next = 0;
        if (lane0) next = int(gridDim.x) + atomicAdd(counter, 1);
        if (!walk.seek<kBlockM, kBlockN>(*this, seqs, idx)) break;
        const int local = idx - walk.first;
        const int head_split = local / walk.units;
        const int j = local - head_split * walk.units;
        const int count = pair_blocks && 2 * j + 1 != walk.m_blocks ? 2 : 1;
        for (int t = 0; t < count; ++t) {
          const Tile tile{t == 1 ? j : walk.m_blocks - 1 - j, head_split % heads, walk.seq, head_split / heads};
          if (lane0) ring.publish(st, tile.m_block, tile.head, tile.batch, tile.split);
          __syncwarp();
          f(tile);
        }
        idx = __shfl_sync(0xffffffffu, next, 0);
      }
      if (lane0) ring.publish(st, -1, 0, 0, 0);
    } else if constexpr (kPersistent) {
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

  // hb: (head, split, batch), head fastest.
  CUTE_DEVICE Tile make_tile(int m_block, int hb) const {
    const int rest = hb / heads;
    return Tile{m_block, hb - rest * heads, rest / splits, rest % splits};
  }

  // Work items per (head, split) of a sequence of m_blocks m-blocks.
  CUTE_DEVICE int units_of(int m_blocks) const { return pair_blocks ? (m_blocks + 1) / 2 : m_blocks; }

  // A sequence's cost class: floor(log2(key blocks)), 0 without keys (< 31 for int n_blocks). A tile's cost grows
  // with its sequence's key blocks (all of them without a mask; about half on average, and a pair's about all, with
  // causal).
  static CUTE_HOST_DEVICE int cost_class(int n_blocks) {
    int c = 0;
    while (n_blocks >= 2 << c) ++c;
    return c;
  }

  // Position in the packed work list: the sequences class by class, costliest class first (so the cheap items end
  // the walk and even out the CTAs' finishing times, as longest-first scheduling does), in index order within a
  // class. Sequence `seq` holds items [first, first + heads * splits * units), (head, split) by (head, split) as the
  // static order has them; the items of the classes above `cls` and of
  // class cls's sequences in [0, next) come before `end`. Only the classes that hold tiles are walked: a first pass
  // over the lengths collects them (a static bound such as segment ids' or a generous max_seqlen would otherwise
  // start the walk at an empty class, and every empty class costs a pass).
  struct PackedWalk {
    int seq = 0, m_blocks = 0, units = 0, first = 0;
    int cls = -1, next = 0, end = 0;
    unsigned classes = 0;  // the classes with tiles that the walk has not finished, bit c for class c

    // Lane's sequence b's lengths (0 past the sequences), and whether the warp's 32 sequences all start at the
    // packed queries' end (whole warp): then so do all later ones (offsets never decrease in well-formed layouts),
    // and a pass over the lengths ends there, so layouts padded with many empty sequences (segment ids under a
    // static bound) cost what their real sequences cost.
    static CUTE_DEVICE bool lengths_at(Sequences const& seqs, int batch, int b, int& len_q, int& len_k) {
      int q_offset = seqs.q.rows, k_offset;
      len_q = len_k = 0;
      if (b < batch) {
        seqs.q.extent(b, q_offset, len_q);
        seqs.k.extent(b, k_offset, len_k);
      }
      return seqs.q.packed() && __all_sync(0xffffffffu, q_offset >= seqs.q.rows);
    }

    // Whole warp: the classes of the sequences with query rows (each holds tiles, even without keys).
    template <int kBlockN>
    static CUTE_DEVICE unsigned classes_with_tiles(Sequences const& seqs, int batch) {
      unsigned mask = 0;
      for (int base = 0; base < batch; base += 32) {
        int len_q, len_k;
        if (lengths_at(seqs, batch, base + int(threadIdx.x % 32), len_q, len_k)) break;
        if (len_q > 0) mask |= 1u << cost_class((len_k + kBlockN - 1) / kBlockN);
      }
      return __reduce_or_sync(0xffffffffu, mask);
    }

    // Moves to the sequence holding item idx (idx never decreases); false when the list ends before it. Whole
    // warp: 32 sequences' lengths per step, a prefix sum and a vote; one pass over the lengths per class.
    template <int kBlockM, int kBlockN>
    CUTE_DEVICE bool seek(FwdTileScheduler const& s, Sequences const& seqs, int idx) {
      const int lane = threadIdx.x % 32;
      const int batch = s.num_hb / (s.heads * s.splits);
      if (cls < 0) {
        classes = classes_with_tiles<kBlockN>(seqs, batch);
        if (classes == 0) return false;
        cls = 31 - __clz(classes);
      }
      while (idx >= end) {
        if (next >= batch) {  // the class's pass is over: the next class below with tiles
          classes &= ~(1u << cls);
          if (classes == 0) return false;
          cls = 31 - __clz(classes);
          next = 0;
          continue;
        }
        int len_q, len_k;
        if (lengths_at(seqs, batch, next + lane, len_q, len_k)) {
          next = batch;
          continue;
        }
        const int blocks = (len_q + kBlockM - 1) / kBlockM;
        const bool in_class = cost_class((len_k + kBlockN - 1) / kBlockN) == cls;
        int upto = in_class ? s.heads * s.splits * s.units_of(blocks) : 0;  // inclusive prefix over the lanes
        for (int d = 1; d < 32; d *= 2) {
          const int below = __shfl_up_sync(0xffffffffu, upto, d);
          if (lane >= d) upto += below;
        }
        const unsigned past = __ballot_sync(0xffffffffu, end + upto > idx);
        if (past == 0) {
          end += __shfl_sync(0xffffffffu, upto, 31);
          next += 32;
          continue;
        }
        const int hit = __ffs(past) - 1;
        seq = next + hit;
        m_blocks = __shfl_sync(0xffffffffu, blocks, hit);
        units = s.units_of(m_blocks);
        end += __shfl_sync(0xffffffffu, upto, hit);
        first = end - s.heads * s.splits * units;
        next = seq + 1;
      }
      return true;
    }
  };
};

}  // namespace fa3

// Order in which the backward main kernel's CTAs (key block n, kv head, batch) are launched: a 1-D grid whose linear
// id walks the (batch, kv head) pairs in groups of `group` pairs, and inside a group the key block slowest (key block
// 0 of every pair of the group, then key block 1, ...).
//  - group = 1 (unmasked runs): key block fastest. The CTAs of one pair run together and walk the same Q / dO tiles,
//    so L2 serves each tile to all of them; every CTA has the same work.
//  - group ~ SMs / num_n (non-deterministic causal / local runs): about one wave of CTAs per group keeps that L2
//    sharing, and inside the group the heavy key blocks start first (for causal, key block n visits the M-blocks from
//    its diagonal to the end, so lower n has more work): longest-first, which shortens the tail of the launch.
//  - group = all pairs (deterministic causal / local runs): key block n adds into a dQ tile only after every lower key
//    block of its pair did (bwd_dq.cuh). In the key-fastest order all key blocks of a pair start together and key block
//    n then waits for the lower ones to reach its first M-block (for causal a chain over the whole pair); key block
//    slowest starts them in ascending n across all pairs. Measured (NOTES_bwd.md): +43-72 % for deterministic causal;
//    -15 % for deterministic non-causal at 2k (each CTA streams its own Q / dO with little L2 sharing), so unmasked
//    runs keep group = 1.
// In every order a CTA of key block n has a higher linear id than the lower key blocks of its pair, so the
// deterministic mode's waits are on CTAs that are resident or finished: no deadlock.
//
// Packed keys (kVarlen) whose grid above would be mostly empty (more than kSparseGridFactor times the CTAs of this
// one) take another grid: CTA (key-row block R of the packed tensor, kv head) runs the key tiles
// that start in rows [R * kBlockN, (R + 1) * kBlockN) (TilesStartingIn, fa3/sequences.h; docs/kernels.md §10.2), so
// the grid follows the keys' rows, not the number of sequences times the longest one (segment ids give thousands of
// mostly empty sequences). R runs fastest (one head's CTAs run together over its sequences and share their Q / dO in
// L2), or slowest in the deterministic mode (every head's block R before any block R + 1, like key block slowest
// above). A tile's lower key blocks start in lower blocks R, so the deadlock argument above holds.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cute/config.hpp"

#include "fa3/sequences.h"
#include "fa3/visibility.h"

namespace fa3 {
namespace bwd {

constexpr long long kSparseGridFactor = 16;

struct CtaCoord {
  int n_block, kv_head, batch;
};

// Grid for the main kernel; false if it does not fit the launch limits.
inline bool bwd_grid(int num_n, int kv_heads, int batch, dim3& grid) {
  const long long ctas = (long long)num_n * kv_heads * batch;
  if (ctas > 0x7fffffffLL) return false;
  grid = dim3(unsigned(ctas));
  return true;
}

// Pairs per group (the policy above) for a run with num_n key blocks and `pairs` (batch, kv head) pairs.
inline int bwd_pairs_per_group(int num_n, int pairs, bool masked, bool deterministic, int num_sms) {
  if (!masked) return 1;
  if (deterministic) return pairs;
  return std::min(pairs, std::max(1, num_sms / num_n));
}

CUTE_DEVICE CtaCoord bwd_cta_coord(int num_n, int kv_heads, int batch, int group) {
  const int pairs = kv_heads * batch;
  const unsigned per_group = unsigned(group) * unsigned(num_n);  // <= the CTA count (bwd_grid)
  const int g = int(blockIdx.x / per_group);
  const int r = int(blockIdx.x % per_group);
  const int size = min(group, pairs - g * group);  // the last group may be partial
  const int pair = g * group + r % size;
  return CtaCoord{r / size, pair % kv_heads, pair / kv_heads};
}

// The CTA's tiles with kVarlen, in order: one from the launch order above, or on the grid over key-row blocks those of
// its block.
// The cursor is the next sequence to look at (TilesStartingIn), or for the one tile 0 before it and 1 after; all else
// is re-read from the arguments, so that the consumers' loop over tiles keeps one register live across the mainloop
// (a cursor of seven fields made ptxas serialize the WGMMAs, C7512, at d = 128).
template <int kBlockN>
struct BwdTiles {
  template <class Args>
  static CUTE_DEVICE int first(Args const& args) {
    return args.walk_key_blocks ? TilesStartingIn<kBlockN>::first(args.seqs.k, args.batch, block(args)) : 0;
  }

  template <class Args>
  static CUTE_DEVICE bool next(Args const& args, int& cursor, CtaCoord& tile) {
    if (args.walk_key_blocks) {
      int offset, length;
      if (!TilesStartingIn<kBlockN>::next(args.seqs.k, args.batch, block(args), cursor, tile.batch, tile.n_block,
                                          offset, length)) {
        return false;
      }
      tile.kv_head = int(args.deterministic ? blockIdx.x % unsigned(args.kv_heads)
                                            : blockIdx.x / unsigned(args.key_row_blocks));
      return true;
    }
    if (cursor++ > 0) return false;
    tile = bwd_cta_coord(args.num_n_blocks, args.kv_heads, args.batch, args.pairs_per_group);
    return true;
  }

  // The grid over key-row blocks: the CTA's block (the order above).
  template <class Args>
  static CUTE_DEVICE int block(Args const& args) {
    return int(args.deterministic ? blockIdx.x / unsigned(args.kv_heads) : blockIdx.x % unsigned(args.key_row_blocks));
  }
};

// A tile of the main kernel as every role of the CTA sees it: its coordinates and sequence, the M-blocks its key
// block visits (every query head of the GQA group visits them: n_iters (query head, M-block) iterations), and the
// sequence's first workspace row (query head 0; BwdRows).
struct BwdTile {
  CtaCoord cta;
  Sequence seq;
  Range mr;
  int n_iters;
  int64_t ws_row0;
};

// Calls f(BwdTile) for each of the CTA's tiles, in order; every role calls it and so sees the same tiles. Key blocks
// past their sequence's keys have no rows to compute or write and are skipped. Without kVarlen the CTA has one tile,
// whose coordinates and rule the compiler keeps in parameter space as before tiles were walked (a loop over them
// spilled ~1.8 KB there).
template <int kBlockM, int kBlockN, bool kVarlen, class Args, class F>
CUTE_DEVICE void for_each_bwd_tile(Args const& args, F&& f) {
  auto run = [&](CtaCoord const& cta) {
    const Sequence seq = args.seqs.template at<kVarlen>(cta.batch);
    if (cta.n_block * kBlockN >= seq.vis.seqlen_k) return;
    const Range mr = seq.vis.query_blocks(cta.n_block, kBlockM, kBlockN);
    const int n_iters = (mr.hi >= mr.lo ? mr.hi - mr.lo + 1 : 0) * args.group;
    f(BwdTile{cta, seq, mr, n_iters, args.ws_rows.first_row(cta.batch, seq.q_offset)});
  };
  if constexpr (kVarlen) {
    CtaCoord cta;
    for (int cursor = BwdTiles<kBlockN>::first(args); BwdTiles<kBlockN>::next(args, cursor, cta);) run(cta);
  } else {
    run(bwd_cta_coord(args.num_n_blocks, args.kv_heads, args.batch, args.pairs_per_group));
  }
}

}  // namespace bwd
}  // namespace fa3

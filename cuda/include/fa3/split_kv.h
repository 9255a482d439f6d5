// Split-KV (docs/kernels.md §2.10), the host-and-device rules: how a tile's key blocks are cut into splits, where
// the splits' partial results live, and the forward workspace that holds them. Plain data, no CuTe.
//
// With num_splits > 1 the forward runs num_splits tiles per (m-block, head, batch), tile s over the s-th of
// num_splits near-equal chunks of the m-block's visible key blocks. Each writes its own softmax-normalised O and
// its LSE in float32 (an empty chunk: O = 0, LSE = -inf), and a combine kernel (split_kv_combine.cuh) merges them
// into out and lse: out = sum_s exp(LSE_s - LSE) O_s with LSE = log sum_s exp(LSE_s). Decoding has few query rows
// and long caches: without splits batch x heads tiles leave most SMs idle, each tile walking the whole cache.
#pragma once

#include <cstdint>

#include "fa3/visibility.h"

namespace fa3 {

// Splits the launchers accept (the Python heuristic stays far below: each split costs a partial O).
constexpr int kMaxSplits = 256;

// The index-th of `count` chunks of r's key blocks, [n_min + blocks * index / count, n_min + blocks * (index + 1) /
// count): sizes differ by at most one block, and chunks are empty only when count exceeds the blocks. The mask-free
// bounds stay those of the whole range (the mainloop clips them to the chunk).
FA3_HOST_DEVICE BlockRange split_chunk(BlockRange r, int index, int count) {
  const int64_t blocks = r.n_max - r.n_min;
  if (count <= 1 || blocks <= 0) return r;
  const int lo = r.n_min + int(blocks * index / count);
  r.n_max = r.n_min + int(blocks * (index + 1) / count);
  r.n_min = lo;
  return r;
}

// Where split s of query row i (of the tensor's rows) and head h keeps its O and LSE: at the offsets that out and
// lse use for (i, h), in float32 copies of their layouts, copy s starting at s * out_split / s * lse_split
// elements.
struct SplitPartials {
  int count = 1;  // num_splits; 1: the forward writes out and lse itself
  float* out = nullptr;
  float* lse = nullptr;
  int64_t out_split = 0, lse_split = 0;
};

// The forward's workspace: the dynamic tile counter (non-uniform problems on the persistent grid,
// fa3/tile_scheduler.cuh), then, with splits, the partial O and LSE of `rows_q` query rows (the q tensor's rows:
// batch * seqlen_q) and `heads` heads.
struct FwdWorkspace {
  static constexpr int64_t kPartialsOffset = 256;  // past the counter, 256-byte aligned

  static int64_t out_elements(int64_t rows_q, int64_t heads, int64_t head_dim_v) { return rows_q * heads * head_dim_v; }
  static int64_t lse_elements(int64_t rows_q, int64_t heads) { return rows_q * heads; }

  static int64_t bytes(bool counter, int splits, int64_t rows_q, int64_t heads, int64_t head_dim_v) {
    if (splits <= 1) return counter ? int64_t(sizeof(int)) : 0;
    return kPartialsOffset +
           int64_t(sizeof(float)) * splits * (out_elements(rows_q, heads, head_dim_v) + lse_elements(rows_q, heads));
  }
  static int* counter(void* ws) { return static_cast<int*>(ws); }
  static SplitPartials partials(void* ws, int splits, int64_t rows_q, int64_t heads, int64_t head_dim_v) {
    SplitPartials p;
    p.count = splits;
    if (splits <= 1) return p;
    p.out_split = out_elements(rows_q, heads, head_dim_v);
    p.lse_split = lse_elements(rows_q, heads);
    p.out = reinterpret_cast<float*>(static_cast<char*>(ws) + kPartialsOffset);
    p.lse = p.out + splits * p.out_split;
    return p;
  }
};

}  // namespace fa3

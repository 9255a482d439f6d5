// Workspace sizes of the fa3_jax kernels (host only).
//
// Kept free of CuTe/CUTLASS/CUDA includes: the nanobind module includes this header so that Python can size the
// `workspace` FFI result at trace time. The forward definition lives in cuda/ffi/fwd.cu, the backward one in
// cuda/ffi/bwd.cu, the segment layout's in cuda/ffi/segments.cu.
#pragma once

#include <cstdint>

namespace fa3 {

// varlen: the problem is not uniform (fa3/sequences.h: a packed side or seqused); num_splits: split-KV's splits
// (fa3/split_kv.h; > 1 only for BSHD queries of seqlen_q rows).
int64_t fwd_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads, int64_t kv_heads,
                            int64_t head_dim, int64_t head_dim_v, bool varlen, int64_t num_splits);

// seqlen_q / seqlen_k: the BSHD seqlens or the max_seqlen bounds of packed sides; total_q: the rows of packed
// queries, 0 when they are BSHD.
int64_t bwd_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads, int64_t kv_heads,
                            int64_t head_dim, int64_t head_dim_v, bool deterministic, int64_t total_q);

// The segment-layout derivation's, for segment ids (rows, seqlen).
int64_t segment_layout_workspace_bytes(int64_t rows, int64_t seqlen);

}  // namespace fa3

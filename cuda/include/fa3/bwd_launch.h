// Light declaration of the backward entry point (no CuTe), for the FFI handler and tests.
//
// run_bwd<Element, kHeadDim, kHeadDimV> is explicitly instantiated once per (dtype, head-dim pair) in the TUs that
// CMake generates from cuda/kernels/bwd.cu.in; its definition lives in fa3/bwd_launch.cuh. The workspace layout below
// is shared by the launcher and by fa3::bwd_workspace_bytes (cuda/ffi/bwd.cu), so both always agree.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fa3/params.h"

namespace cutlass {
struct half_t;
struct bfloat16_t;
}  // namespace cutlass

namespace fa3 {

// Backward tiles (docs/kernels.md §3.11; benchmarks/NOTES_bwd.md says why): query rows per M-block (kBlockM) and
// key rows per CTA (kBlockN). Host-visible because the workspace size depends on kBlockM.
constexpr int bwd_block_m(int /*head_dim*/) { return 64; }
constexpr int bwd_block_n(int head_dim) { return head_dim <= 128 ? 128 : 64; }

// Rows of the per-row workspace sections below: every (sequence, query head) owns whole M-blocks of rows.
//   BSHD queries: (batch, heads, m-blocks of the seqlen) in that order, `head_rows` rows per (batch entry, head).
//   Packed queries: `head_rows` rows per head; sequence b's M-blocks start at row
//   floor((offset_b + b * kBlockM) / kBlockM) * kBlockM. For nondecreasing offsets (offset_{b+1} >= offset_b +
//   length_b) these regions never overlap, and for any offsets in [0, total] they end within total + batch * kBlockM
//   rows, which `head_rows` holds.
struct BwdRows {
  static constexpr int kBlockM = bwd_block_m(0);
  bool packed = false;
  int heads = 0;
  int64_t head_rows = 0;

  static BwdRows make(int64_t batch, int64_t seqlen_q, int64_t total_q, int64_t heads) {
    BwdRows r;
    r.packed = total_q > 0;
    r.heads = int(heads);
    const int64_t rows = r.packed ? total_q + batch * kBlockM : seqlen_q;
    r.head_rows = (rows + kBlockM - 1) / kBlockM * kBlockM;
    return r;
  }
  int64_t total(int64_t batch) const { return (packed ? 1 : batch) * heads * head_rows; }
  // First row of sequence b (whose queries start at row q_offset of a packed tensor) for query head 0; head h's
  // rows start h * head_rows later in both forms.
  FA3_HOST_DEVICE int64_t first_row(int b, int q_offset) const {
    if (!packed) return int64_t(b) * heads * head_rows;
    return (q_offset + int64_t(b) * kBlockM) & ~int64_t(kBlockM - 1);
  }
  FA3_HOST_DEVICE int64_t first_row(int b, int head, int q_offset) const {
    return first_row(b, q_offset) + head * head_rows;
  }
};

// The preprocess / postprocess grid of packed queries: one CTA per (kBlockM rows of the tensor, head), head fastest,
// each taking the M-blocks that start in its rows (TilesStartingIn), so that the grid follows the rows, not the
// number of sequences times their bound.
struct PackedRowBlocks {
  static long long count(int rows, int heads) {
    return (long long)(rows + BwdRows::kBlockM - 1) / BwdRows::kBlockM * heads;
  }
#ifdef __CUDACC__
  // (row block, head) of this CTA.
  __device__ static void of_cta(int heads, int& block, int& head) {
    head = int(blockIdx.x % unsigned(heads));
    block = int(blockIdx.x / unsigned(heads));
  }
#endif
};

// Workspace sections (byte offsets, each 256-aligned), over the rows of BwdRows:
//   [sem]  int32 per M-block of rows: deterministic dQ turn counters                (zeroed; deterministic only)
//   [dq]   fp32 dQ accumulator, per M-block one kBlockM x d tile in MMA-fragment order (zeroed by the preprocess)
//   [lse]  fp32 lse * log2(e) per row (-inf -> 0, padding -> +inf)
//   [dsum] fp32 D = rowsum(dO * O) - dlse per row (padding -> 0)
struct BwdWorkspaceLayout {
  int64_t sem = 0, dq = 0, lse = 0, dsum = 0, total = 0;
  int64_t zero_bytes = 0;  // [0, zero_bytes) is zeroed by a memset (the semaphores; the preprocess zeroes [dq])
};

// seqlen_q: the queries' seqlen (BSHD) or max_seqlen; total_q: the rows of packed queries, 0 for BSHD.
inline BwdWorkspaceLayout bwd_workspace_layout(int64_t batch, int64_t seqlen_q, int64_t total_q, int64_t heads,
                                               int64_t head_dim, bool deterministic) {
  auto align = [](int64_t x) { return (x + 255) & ~int64_t(255); };
  const BwdRows r = BwdRows::make(batch, seqlen_q, total_q, heads);
  const int64_t rows = r.total(batch);
  BwdWorkspaceLayout w;
  w.sem = 0;
  w.dq = deterministic ? align(rows / BwdRows::kBlockM * 4) : 0;
  w.lse = w.dq + align(rows * head_dim * 4);
  w.dsum = w.lse + align(rows * 4);
  w.total = w.dsum + align(rows * 4);
  w.zero_bytes = w.dq;
  return w;
}

// Runs preprocess, main and postprocess kernels on `stream`. No allocation, no synchronisation. The caller
// guarantees compute capability 9.0; fa3::valid_problem; head dims match the instantiation; 16-byte aligned pointers
// and row strides that are multiples of 8 elements; workspace of bwd_workspace_bytes(...). Returns the first CUDA
// error.
template <class Element, int kHeadDim, int kHeadDimV>
cudaError_t run_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace fa3

// Light declaration of the backward entry point (no CuTe), for the FFI handler and tests.
//
// run_bwd<Element, kHeadDim, kHeadDimV> is explicitly instantiated once per (dtype, head-dim pair) in the TUs that
// CMake generates from cuda/kernels/bwd.cu.in; its definition lives in fa3/bwd_launch.cuh. The workspace layout below
// is shared by the launcher and by fa3::bwd_workspace_bytes (cuda/ffi/bwd.cu), so both always agree.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace cutlass {
struct half_t;
struct bfloat16_t;
}  // namespace cutlass

namespace fa3 {

struct BwdParams {
  // BSHD, row-major, contiguous. dout/out: (b, s_q, h, d_v), q: (b, s_q, h, d), k: (b, s_k, h_k, d),
  // v: (b, s_k, h_k, d_v); lse: (b, h, s_q) float32, natural log, -inf for rows with no visible key.
  const void* dout = nullptr;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const float* lse = nullptr;
  const float* dlse = nullptr;  // (b, h, s_q) float32 cotangent of lse, or nullptr (lse not differentiated)
  void* dq = nullptr;  // (b, s_q, h, d)
  void* dk = nullptr;  // (b, s_k, h_k, d)
  void* dv = nullptr;  // (b, s_k, h_k, d_v)
  void* workspace = nullptr;  // bwd_workspace_bytes(...) bytes, contents undefined on entry, >= 256-byte aligned
  int64_t workspace_bytes = 0;

  int batch = 0, seqlen_q = 0, seqlen_k = 0, heads = 0, kv_heads = 0, head_dim = 0, head_dim_v = 0;
  float softmax_scale = 1.f;
  float softcap = 0.f;  // 0 = off
  // Bottom-right window (fa3/visibility.h, which also clamps it).
  int64_t window_left = 0, window_right = 0;
  bool deterministic = false;
  int device = 0;  // CUDA ordinal of `stream`'s device (per-device caches)
};

// Backward tiles (docs/kernels.md §3.11; benchmarks/NOTES_bwd.md says why): query rows per M-block (kBlockM) and
// key rows per CTA (kBlockN). Host-visible because the workspace size depends on kBlockM.
constexpr int bwd_block_m(int /*head_dim*/) { return 64; }
constexpr int bwd_block_n(int head_dim) { return head_dim <= 128 ? 128 : 64; }

// Workspace sections (byte offsets, each 256-aligned):
//   [sem]  int32 per (b, h, m-block): deterministic dQ turn counters            (zeroed; deterministic only)
//   [dq]   fp32 dQ accumulator, per (b, h, m-block) one kBlockM x d tile in MMA-fragment order (zeroed by the
//          preprocess)
//   [lse]  fp32 lse * log2(e) per (b, h, row), rows padded to whole M-blocks (-inf -> 0, padding -> +inf)
//   [dsum] fp32 D = rowsum(dO * O) - dlse, same shape (padding -> 0)
struct BwdWorkspaceLayout {
  int64_t sem = 0, dq = 0, lse = 0, dsum = 0, total = 0;
  int64_t zero_bytes = 0;  // [0, zero_bytes) is zeroed by a memset (the semaphores; the preprocess zeroes [dq])
};

inline BwdWorkspaceLayout bwd_workspace_layout(int64_t batch, int64_t seqlen_q, int64_t heads, int64_t head_dim,
                                               bool deterministic) {
  auto align = [](int64_t x) { return (x + 255) & ~int64_t(255); };
  const int64_t bm = bwd_block_m(int(head_dim));
  const int64_t m_blocks = (seqlen_q + bm - 1) / bm;
  const int64_t rows = batch * heads * m_blocks * bm;
  BwdWorkspaceLayout w;
  w.sem = 0;
  w.dq = deterministic ? align(batch * heads * m_blocks * 4) : 0;
  w.lse = w.dq + align(rows * head_dim * 4);
  w.dsum = w.lse + align(rows * 4);
  w.total = w.dsum + align(rows * 4);
  w.zero_bytes = w.dq;
  return w;
}

// Runs preprocess, main and postprocess kernels on `stream`. No allocation, no synchronisation. The caller
// guarantees compute capability 9.0, 1 <= seqlen_q, seqlen_k; heads % kv_heads == 0; head dims match the
// instantiation; 16-byte aligned pointers; workspace of bwd_workspace_bytes(...). Returns the first CUDA error.
template <class Element, int kHeadDim, int kHeadDimV>
cudaError_t run_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace fa3

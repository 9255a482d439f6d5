// Plain-data parameters of the forward kernel family (host and device; no CuTe).
//
// Filled in exactly one place (cuda/ffi/fwd.cu, or a test harness), read by fa3::run_fwd. Layout is BSHD, row-major
// and contiguous per the Python contract, but strides are carried explicitly so that the kernel never assumes it.
#pragma once

#include <cstdint>

namespace fa3 {

struct FwdParams {
  // Tensors. q: (b, s_q, h, d), k: (b, s_k, h_k, d), v: (b, s_k, h_k, d_v), out: (b, s_q, h, d_v) in the element
  // type of the instantiation; lse: (b, h, s_q) float32, natural log.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  // Strides in elements.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse row stride is 1

  int batch = 0, seqlen_q = 0, seqlen_k = 0, heads = 0, kv_heads = 0;
  int head_dim = 0, head_dim_v = 0;

  float softmax_scale = 1.f;  // must be > 0
  float softcap = 0.f;        // 0 = off
  // Bottom-right aligned window (fa3/visibility.h): row i sees key j iff
  // i + s_k - s_q - window_left <= j <= i + s_k - s_q + window_right. Any int64 is accepted (Visibility::make clamps).
  int64_t window_left = 0;
  int64_t window_right = 0;

  void* workspace = nullptr;  // unused by the forward today (fwd_workspace_bytes == 0)
  int64_t workspace_bytes = 0;

  int device = 0;  // CUDA device ordinal the stream belongs to (per-device caches key on it)
};

}  // namespace fa3

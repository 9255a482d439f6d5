// Plain-data parameters of the kernel family (host and device; no CuTe): one base shared by both directions
// (the inputs q, k, v, their sequence layout and the attention rule), extended by each direction with its own
// tensors. Filled by named assignment in one place per caller (cuda/ffi/problem.h for the FFI handlers, the
// harnesses under cuda/tests/), read by fa3::run_fwd / fa3::run_bwd. docs/kernels.md §10.4 describes them.
#pragma once

#include <cstdint>

#include "fa3/sequences.h"

namespace fa3 {

// Element strides of a (batch, row, head, dim) tensor; dim is contiguous. A packed tensor (rows of all sequences
// back to back, fa3/sequences.h) has batch stride 0: its sequences are found by row offset.
struct Strides {
  int64_t batch = 0, row = 0, head = 0;

  // Contiguous BSHD (batch, seqlen, heads, dim), or packed (total, heads, dim) when seqlen is 0.
  static Strides contiguous(int64_t seqlen, int64_t heads, int64_t dim) {
    return Strides{seqlen * heads * dim, heads * dim, dim};
  }
  // A (batch, heads, seqlen) row statistic such as lse, or (heads, total) when packed (batch = 0, heads rows of
  // `seqlen` = total).
  static Strides row_stat(int64_t heads, int64_t seqlen, bool packed) {
    return Strides{packed ? 0 : heads * seqlen, 1, seqlen};
  }
};

constexpr int kMaxDevices = 64;  // device ordinals the per-device caches (fa3/launch_setup.h) hold

struct AttnParams {
  // q: (b, s_q, h, d) or packed (total_q, h, d); k: (b, s_k, h_k, d) or (total_k, h_k, d); v like k with d_v.
  // Element type of the instantiation.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_strides, k_strides, v_strides;

  int batch = 0, heads = 0, kv_heads = 0, head_dim = 0, head_dim_v = 0;
  // Where each sequence's rows are and how many take part; `len`: the tensor's seqlen (BSHD) or the bound
  // max_seqlen (packed); `rows`: the tensor's rows per batch entry (s) or in total (packed).
  SeqSide seq_q, seq_k;

  float softmax_scale = 1.f;  // must be > 0
  float softcap = 0.f;        // 0 = off
  // Bottom-right aligned window per sequence (fa3/visibility.h, which clamps it; any int64 is accepted).
  int64_t window_left = 0, window_right = 0;

  void* workspace = nullptr;  // the direction's workspace_bytes(...) bytes, contents undefined on entry
  int64_t workspace_bytes = 0;
  int device = 0;  // CUDA device ordinal the stream belongs to (per-device caches key on it)

  Sequences sequences() const { return Sequences::make(seq_q, seq_k, window_left, window_right); }
};

struct FwdParams : AttnParams {
  void* out = nullptr;  // like q with d_v
  float* lse = nullptr;  // (b, h, s_q) or packed (h, total_q) float32, natural log
  Strides out_strides, lse_strides;
  // Split-KV (fa3/split_kv.h): tiles per (m-block, head, batch), in [1, kMaxSplits]; > 1 needs BSHD queries without
  // seqused_q (every query row belongs to a tile) and the workspace for the partials.
  int num_splits = 1;
};

struct BwdParams : AttnParams {
  const void* dout = nullptr;  // like out
  const void* out = nullptr;   // like q with d_v
  const float* lse = nullptr;  // as the forward's; -inf for rows with no visible key
  const float* dlse = nullptr;  // lse's cotangent, same layout, or nullptr (lse not differentiated)
  void* dq = nullptr;  // like q
  void* dk = nullptr;  // like k
  void* dv = nullptr;  // like v
  Strides dout_strides, out_strides, lse_strides, dq_strides, dk_strides, dv_strides;
  bool deterministic = false;
};

// What the launchers accept besides the head dims of their instantiation (the handlers check it with messages):
// sizes >= 1, heads % kv_heads == 0, a BSHD side's rows equal to its seqlen, a device ordinal the caches hold.
inline bool valid_problem(const AttnParams& p) {
  auto side_ok = [](const SeqSide& s) { return s.len >= 1 && s.rows >= 1 && (s.packed() || s.rows == s.len); };
  return p.batch >= 1 && p.heads >= 1 && p.kv_heads >= 1 && p.heads % p.kv_heads == 0 && side_ok(p.seq_q) &&
         side_ok(p.seq_k) && p.device >= 0 && p.device < kMaxDevices;
}

}  // namespace fa3

// The part of an FFI call both directions share: the inputs q, k, v, the sequence layout that says where each
// sequence's rows are (fa3/sequences.h) and the attention rule, decoded, checked and written into fa3::AttnParams
// by named assignment, here only. Host-only; included by cuda/ffi/*.cu.
//
// Sequence-layout operands (optional, after each op's other optional operands; announced by with_<name>):
//   cu_seqlens_q (b + 1) int32: q is packed (total_q, h, d), as are out / dq / dout, and lse is (h, total_q);
//                               else q is BSHD (b, s_q, h, d) and lse (b, h, s_q);
//   cu_seqlens_k (b + 1) int32: k and v are packed (total_k, h_k, d / d_v), as are dk / dv; else BSHD;
//   seqused_q / seqused_k (b) int32: rows taking part per sequence (either form).
// Attrs max_seqlen_q / max_seqlen_k: the bound of a packed side's lengths; a BSHD side's seqlen otherwise.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fa3/params.h"
#include "handler_checks.h"
#include "xla/ffi/api/ffi.h"

namespace fa3::handler {

namespace ffi = xla::ffi;

// Sequence-layout operands, in the order the ops list them (fa3_jax/_ops.py).
struct SeqOperands {
  std::optional<ffi::AnyBuffer> cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k;
};

// Sizes of a decoded problem and the expected shapes of the tensors that follow q's or k's layout.
struct ProblemShape {
  int64_t batch = 0, rows_q = 0, rows_k = 0, heads = 0, kv_heads = 0, head_dim = 0, head_dim_v = 0;
  bool packed_q = false, packed_k = false;

  // A tensor with q's rows (out, dq, dout) or k's rows (dk, dv), with `heads` heads of `dim`.
  std::vector<int64_t> q_like(int64_t dim) const {
    return packed_q ? std::vector<int64_t>{rows_q, heads, dim} : std::vector<int64_t>{batch, rows_q, heads, dim};
  }
  std::vector<int64_t> k_like(int64_t dim) const {
    return packed_k ? std::vector<int64_t>{rows_k, kv_heads, dim}
                    : std::vector<int64_t>{batch, rows_k, kv_heads, dim};
  }
  std::vector<int64_t> lse() const {
    return packed_q ? std::vector<int64_t>{heads, rows_q} : std::vector<int64_t>{batch, heads, rows_q};
  }
  Strides q_strides(int64_t dim) const { return Strides::contiguous(packed_q ? 0 : rows_q, heads, dim); }
  Strides k_strides(int64_t dim) const { return Strides::contiguous(packed_k ? 0 : rows_k, kv_heads, dim); }
  Strides lse_strides() const { return Strides::row_stat(heads, rows_q, packed_q); }
};

inline bool dims_equal(ffi::Span<const int64_t> x, const std::vector<int64_t>& y) {
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < y.size(); ++i) {
    if (x[i] != y[i]) return false;
  }
  return true;
}

inline std::string dims_str(const std::vector<int64_t>& d) {
  return dims_str(ffi::Span<const int64_t>(d.data(), d.size()));
}

// Success iff `buffer` has `dims` (and float32 if `f32`); the message names the buffer and both shapes.
inline ffi::Error check_shape(const std::string& target, const char* name, const ffi::AnyBuffer& buffer,
                              const std::vector<int64_t>& dims, bool f32 = false) {
  if (!dims_equal(buffer.dimensions(), dims) || (f32 && buffer.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument(target + ": " + name + " must be " + (f32 ? "f32 " : "") + dims_str(dims) +
                                       ", got " + dims_str(buffer.dimensions()));
  }
  return ffi::Error::Success();
}

// Decodes q, k, v and the sequence layout into `p` (pointers, strides, sizes, sequences, the rule, the device) and
// `shape`. The caller checks the dtypes and its direction's other tensors against `shape`.
inline ffi::Error decode_problem(const std::string& target, int32_t device, const ffi::AnyBuffer& q,
                                 const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, const SeqOperands& seq,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, float softmax_scale, float softcap,
                                 int64_t window_left, int64_t window_right, AttnParams& p, ProblemShape& shape) {
  ProblemShape& s = shape;
  s.packed_q = seq.cu_seqlens_q.has_value();
  s.packed_k = seq.cu_seqlens_k.has_value();
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != (s.packed_q ? 3u : 4u) || kd.size() != (s.packed_k ? 3u : 4u) || vd.size() != kd.size()) {
    return ffi::Error::InvalidArgument(target + ": q must be rank " + (s.packed_q ? "3 (packed)" : "4 (BSHD)") +
                                       " and k, v rank " + (s.packed_k ? "3 (packed)" : "4 (BSHD)") + ", got q" +
                                       dims_str(qd) + " k" + dims_str(kd) + " v" + dims_str(vd));
  }
  const size_t q0 = s.packed_q ? 0 : 1, k0 = s.packed_k ? 0 : 1;  // index of the rows dimension
  s.rows_q = qd[q0];
  s.heads = qd[q0 + 1];
  s.head_dim = qd[q0 + 2];
  s.rows_k = kd[k0];
  s.kv_heads = kd[k0 + 1];
  s.head_dim_v = vd[k0 + 2];
  // The batch: from cu_seqlens where a side is packed, else from the BSHD dimension; both sides must agree.
  auto batch_of = [](const std::optional<ffi::AnyBuffer>& cu, ffi::Span<const int64_t> dims) -> int64_t {
    if (!cu) return dims[0];
    return cu->dimensions().size() == 1 ? cu->dimensions()[0] - 1 : -1;
  };
  s.batch = batch_of(seq.cu_seqlens_q, qd);
  const int64_t batch_k = batch_of(seq.cu_seqlens_k, kd);
  if (batch_k != s.batch) {
    return ffi::Error::InvalidArgument(target + ": the q side has batch " + std::to_string(s.batch) +
                                       " and the k side " + std::to_string(batch_k));
  }
  if (ffi::Error e = check_shape(target, "k", k, s.k_like(s.head_dim)); e.failure()) return e;
  if (ffi::Error e = check_shape(target, "v", v, s.k_like(s.head_dim_v)); e.failure()) return e;
  const std::optional<ffi::AnyBuffer>* ints[] = {&seq.cu_seqlens_q, &seq.cu_seqlens_k, &seq.seqused_q,
                                                 &seq.seqused_k};
  const char* names[] = {"cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k"};
  for (int i = 0; i < 4; ++i) {
    const std::optional<ffi::AnyBuffer>& b = *ints[i];
    if (!b) continue;
    const int64_t n = i < 2 ? s.batch + 1 : s.batch;
    if (b->element_type() != ffi::DataType::S32 || !dims_equal(b->dimensions(), std::vector<int64_t>{n})) {
      return ffi::Error::InvalidArgument(target + ": " + names[i] + " must be int32 (" + std::to_string(n) +
                                         "), got " + dims_str(b->dimensions()));
    }
  }
  // A BSHD side's sequences are its seqlen long at most; a packed side's are bounded by max_seqlen.
  if ((!s.packed_q && max_seqlen_q != s.rows_q) || (!s.packed_k && max_seqlen_k != s.rows_k)) {
    return ffi::Error::InvalidArgument(target + ": max_seqlen_q / max_seqlen_k of a BSHD side must be its seqlen");
  }
  if (ffi::Error e = check_problem(target, s.batch, max_seqlen_q, max_seqlen_k, s.heads, s.kv_heads, softmax_scale,
                                   softcap);
      e.failure()) {
    return e;
  }
  if (s.rows_q < 1 || s.rows_k < 1 || s.rows_q > INT32_MAX || s.rows_k > INT32_MAX) {
    return ffi::Error::InvalidArgument(target + ": packed q and k need 1 <= rows < 2^31");
  }

  auto side = [](const std::optional<ffi::AnyBuffer>& cu, const std::optional<ffi::AnyBuffer>& used, int64_t len,
                 int64_t rows) {
    SeqSide r;
    r.cu = cu ? static_cast<const int*>(cu->untyped_data()) : nullptr;
    r.used = used ? static_cast<const int*>(used->untyped_data()) : nullptr;
    r.len = int(len);
    r.rows = int(rows);
    return r;
  };
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.q_strides = s.q_strides(s.head_dim);
  p.k_strides = s.k_strides(s.head_dim);
  p.v_strides = s.k_strides(s.head_dim_v);
  p.batch = int(s.batch);
  p.heads = int(s.heads);
  p.kv_heads = int(s.kv_heads);
  p.head_dim = int(s.head_dim);
  p.head_dim_v = int(s.head_dim_v);
  p.seq_q = side(seq.cu_seqlens_q, seq.seqused_q, max_seqlen_q, s.rows_q);
  p.seq_k = side(seq.cu_seqlens_k, seq.seqused_k, max_seqlen_k, s.rows_k);
  p.softmax_scale = softmax_scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.window_right = window_right;
  p.device = device;
  return ffi::Error::Success();
}

}  // namespace fa3::handler

// XLA FFI handler "fa3_jax_fwd": decode buffers and attributes, check what Python cannot, fill fa3::FwdParams, pick
// the compiled (dtype, d, d_v) instantiation and launch it on XLA's stream. No kernel logic here.
//
// Operands q (b, s_q, h, d), k (b, s_k, h_k, d), v (b, s_k, h_k, d_v), bf16|f16, contiguous; then the
//          sequence-layout operands present (problem.h: cu_seqlens_q / _k make a side packed, seqused_q / _k).
// Results  out (q's layout with d_v, dtype of q), lse (b, h, s_q) or packed (h, total_q) f32, workspace (n,) u8
//          with n = fa3::fwd_workspace_bytes(...) (the dynamic tile counter of non-uniform problems, split-KV's
//          partials, or nothing).
// Attrs    softmax_scale f32 (> 0), softcap f32 (0 = off), window_left i64, window_right i64 (bottom-right aligned
//          per sequence, already resolved by Python; see fa3/visibility.h), max_seqlen_q i64, max_seqlen_k i64,
//          with_cu_seqlens_q, with_cu_seqlens_k, with_seqused_q, with_seqused_k bool, num_splits i64 (split-KV,
//          fa3/split_kv.h: 1, or up to fa3::kMaxSplits with BSHD queries and no seqused_q).
//
// Marked kCmdBufferCompatible (docs/integration.md §2.5), so XLA may trace it into a CUDA graph: every call with
// the same shapes and attributes launches the same work; no allocation, sync or host reads of device data; TMA descriptors
// are rebuilt per call and passed by value (XLA re-traces when buffer addresses change). The one-time
// cudaFuncSetAttribute is no stream operation, so capture does not record it. tests/gpu/test_command_buffer_gpu.py
// checks that XLA puts the call into a command buffer and that replays with new inputs match graph-free runs.
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "fa3/fwd_launch.h"
#include "fa3/params.h"
#include "fa3/split_kv.h"
#include "fa3/tile_size.h"
#include "fa3/workspace.h"
#include "fa3_kernel_list.h"
#include "handler_checks.h"
#include "optional_operands.h"
#include "problem.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace fa3 {

// Non-uniform problems (kVarlen) on the persistent grid hand out their tiles through a counter
// (fa3/tile_scheduler.cuh); split-KV keeps its partials there (fa3/split_kv.h).
int64_t fwd_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t, int64_t heads, int64_t, int64_t head_dim,
                            int64_t head_dim_v, bool varlen, int64_t num_splits) {
  return FwdWorkspace::bytes(varlen && fwd_persistent(int(head_dim), int(head_dim_v)), int(num_splits),
                             batch * seqlen_q, heads, head_dim_v);
}

}  // namespace fa3

namespace {

using LaunchFn = cudaError_t (*)(const fa3::FwdParams&, cudaStream_t);

#define FA3_FWD_DISPATCH_ENTRY(...) FA3_SELECT_KERNEL_ENTRY(fa3::run_fwd, __VA_ARGS__)

LaunchFn select_kernel(bool is_bf16, int64_t d, int64_t dv) {
  FA3_JAX_FWD_KERNELS(FA3_FWD_DISPATCH_ENTRY)
  return nullptr;
}

ffi::Error Fa3Fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                  ffi::RemainingArgs optional, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                  ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale, float softcap, int64_t window_left,
                  int64_t window_right, int64_t max_seqlen_q, int64_t max_seqlen_k, bool with_cu_seqlens_q,
                  bool with_cu_seqlens_k, bool with_seqused_q, bool with_seqused_k, int64_t num_splits) {
  const std::string target = "fa3_jax_fwd";
  if (ffi::Error e = fa3::handler::check_hopper_device(target, device); e.failure()) return e;
  std::array<std::optional<ffi::AnyBuffer>, 4> seq_operands;
  if (ffi::Error e = fa3::handler::decode_optional_operands(
          target, optional, {with_cu_seqlens_q, with_cu_seqlens_k, with_seqused_q, with_seqused_k}, seq_operands);
      e.failure()) {
    return e;
  }
  const auto dt = q.element_type();
  if (ffi::Error e = fa3::handler::check_dtypes(target, "q, k, v, out",
                                                {dt, k.element_type(), v.element_type(), out->element_type()});
      e.failure()) {
    return e;
  }
  fa3::FwdParams p;
  fa3::handler::ProblemShape shape;
  const fa3::handler::SeqOperands seq{seq_operands[0], seq_operands[1], seq_operands[2], seq_operands[3]};
  if (ffi::Error e = fa3::handler::decode_problem(target, device, q, k, v, seq, max_seqlen_q, max_seqlen_k,
                                                  softmax_scale, softcap, window_left, window_right, p, shape);
      e.failure()) {
    return e;
  }
  using fa3::handler::check_shape;
  if (ffi::Error e = check_shape(target, "out", *out, shape.q_like(shape.head_dim_v)); e.failure()) return e;
  if (ffi::Error e = check_shape(target, "lse", *lse, shape.lse(), /*f32=*/true); e.failure()) return e;
  const LaunchFn fn = select_kernel(dt == ffi::DataType::BF16, shape.head_dim, shape.head_dim_v);
  if (fn == nullptr) {
    return ffi::Error::InvalidArgument(target + ": no kernel compiled for head dims (" +
                                       std::to_string(shape.head_dim) + ", " + std::to_string(shape.head_dim_v) + ")");
  }
  if (num_splits < 1 || num_splits > fa3::kMaxSplits || (num_splits > 1 && !p.seq_q.uniform())) {
    return ffi::Error::InvalidArgument(target + ": num_splits must be 1, or in [2, " +
                                       std::to_string(fa3::kMaxSplits) +
                                       "] with BSHD queries and no seqused_q; got " + std::to_string(num_splits));
  }
  p.num_splits = int(num_splits);
  const int64_t ws_needed = fa3::fwd_workspace_bytes(shape.batch, max_seqlen_q, max_seqlen_k, shape.heads,
                                                     shape.kv_heads, shape.head_dim, shape.head_dim_v,
                                                     !p.sequences().uniform(), num_splits);
  if (int64_t(workspace->size_bytes()) < ws_needed) {
    return ffi::Error::InvalidArgument(target + ": workspace too small");
  }

  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  p.out_strides = shape.q_strides(shape.head_dim_v);
  p.lse_strides = shape.lse_strides();
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = int64_t(workspace->size_bytes());

  const cudaError_t err = fn(p, stream);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(target + ": launch failed: " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_jax_fwd, Fa3Fwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .RemainingArgs()        // sequence-layout operands, announced by with_* attributes
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<int64_t>("max_seqlen_q")
                                  .Attr<int64_t>("max_seqlen_k")
                                  .Attr<bool>("with_cu_seqlens_q")
                                  .Attr<bool>("with_cu_seqlens_k")
                                  .Attr<bool>("with_seqused_q")
                                  .Attr<bool>("with_seqused_k")
                                  .Attr<int64_t>("num_splits"),
                              {ffi::Traits::kCmdBufferCompatible});

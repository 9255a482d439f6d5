// XLA FFI handler "fa3_jax_bwd": decode buffers and attributes, check what Python cannot, fill fa3::BwdParams, pick
// the compiled (dtype, d, d_v) instantiation and launch it on XLA's stream. No kernel logic here.
//
// Operands dout (q's layout with d_v), q (b, s_q, h, d), k (b, s_k, h_k, d), v (b, s_k, h_k, d_v), out (like dout)
//          (bf16|f16, all the same, contiguous), lse (b, h, s_q) f32 (natural log, -inf = row sees no key);
//          then the optional operands present (optional_operands.h): dlse (like lse) f32, the cotangent of lse,
//          and the sequence layout (problem.h: cu_seqlens_q / _k make a side packed, (h, total_q) for lse).
// Results  dq, dk, dv (layouts and dtype of q, k, v), workspace (n,) u8 with n = fa3::bwd_workspace_bytes(...)
//          (contents undefined on entry; zeroed on the stream where needed).
// Attrs    softmax_scale f32 (> 0), softcap f32 (0 = off), window_left i64, window_right i64 (bottom-right aligned
//          per sequence, resolved by Python), max_seqlen_q i64, max_seqlen_k i64, deterministic bool
//          (bitwise-reproducible dq/dk/dv), with_dlse, with_cu_seqlens_q, with_cu_seqlens_k, with_seqused_q,
//          with_seqused_k bool.
//
// Marked kCmdBufferCompatible for the forward's reasons (cuda/ffi/fwd.cu); the workspace is zeroed by the preprocess
// kernel and, for the deterministic semaphores, cudaMemsetAsync on the stream, which a graph captures as a memset
// node.
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "cutlass/numeric_types.h"
#include "fa3/bwd_launch.h"
#include "fa3/workspace.h"
#include "fa3_kernel_list.h"
#include "handler_checks.h"
#include "optional_operands.h"
#include "problem.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace fa3 {

int64_t bwd_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t /*seqlen_k*/, int64_t heads,
                            int64_t /*kv_heads*/, int64_t head_dim, int64_t /*head_dim_v*/, bool deterministic,
                            int64_t total_q) {
  return bwd_workspace_layout(batch, seqlen_q, total_q, heads, head_dim, deterministic).total;
}

}  // namespace fa3

namespace {

using LaunchFn = cudaError_t (*)(const fa3::BwdParams&, cudaStream_t);

#define FA3_BWD_DISPATCH_ENTRY(...) FA3_SELECT_KERNEL_ENTRY(fa3::run_bwd, __VA_ARGS__)

LaunchFn select_kernel(bool is_bf16, int64_t d, int64_t dv) {
  FA3_JAX_BWD_KERNELS(FA3_BWD_DISPATCH_ENTRY)
  return nullptr;
}

ffi::Error Fa3Bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer dout, ffi::AnyBuffer q, ffi::AnyBuffer k,
                  ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::RemainingArgs optional,
                  ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                  ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale, float softcap, int64_t window_left,
                  int64_t window_right, int64_t max_seqlen_q, int64_t max_seqlen_k, bool deterministic,
                  bool with_dlse, bool with_cu_seqlens_q, bool with_cu_seqlens_k, bool with_seqused_q,
                  bool with_seqused_k) {
  const std::string target = "fa3_jax_bwd";
  if (ffi::Error e = fa3::handler::check_hopper_device(target, device); e.failure()) return e;
  std::array<std::optional<ffi::AnyBuffer>, 5> opt;  // dlse, then the sequence layout
  if (ffi::Error e = fa3::handler::decode_optional_operands(
          target, optional, {with_dlse, with_cu_seqlens_q, with_cu_seqlens_k, with_seqused_q, with_seqused_k}, opt);
      e.failure()) {
    return e;
  }
  const auto dt = q.element_type();
  if (ffi::Error e = fa3::handler::check_dtypes(target, "q, dout, k, v, out, dq, dk, dv",
                                                {dt, dout.element_type(), k.element_type(), v.element_type(),
                                                 out.element_type(), dq->element_type(), dk->element_type(),
                                                 dv->element_type()});
      e.failure()) {
    return e;
  }
  fa3::BwdParams p;
  fa3::handler::ProblemShape shape;
  const fa3::handler::SeqOperands seq{opt[1], opt[2], opt[3], opt[4]};
  if (ffi::Error e = fa3::handler::decode_problem(target, device, q, k, v, seq, max_seqlen_q, max_seqlen_k,
                                                  softmax_scale, softcap, window_left, window_right, p, shape);
      e.failure()) {
    return e;
  }
  using fa3::handler::check_shape;
  const int64_t d = shape.head_dim, d_v = shape.head_dim_v;
  for (ffi::Error e : {check_shape(target, "dout", dout, shape.q_like(d_v)),
                       check_shape(target, "out", out, shape.q_like(d_v)),
                       check_shape(target, "lse", lse, shape.lse(), /*f32=*/true),
                       check_shape(target, "dq", *dq, shape.q_like(d)), check_shape(target, "dk", *dk, shape.k_like(d)),
                       check_shape(target, "dv", *dv, shape.k_like(d_v))}) {
    if (e.failure()) return e;
  }
  const std::optional<ffi::AnyBuffer>& dlse = opt[0];
  if (dlse) {
    if (ffi::Error e = check_shape(target, "dlse", *dlse, shape.lse(), /*f32=*/true); e.failure()) return e;
  }
  const LaunchFn fn = select_kernel(dt == ffi::DataType::BF16, d, d_v);
  if (fn == nullptr) {
    return ffi::Error::InvalidArgument(target + ": no kernel compiled for head dims (" + std::to_string(d) + ", " +
                                       std::to_string(d_v) + ")");
  }
  const int64_t ws_needed = fa3::bwd_workspace_bytes(shape.batch, max_seqlen_q, max_seqlen_k, shape.heads,
                                                     shape.kv_heads, d, d_v, deterministic,
                                                     shape.packed_q ? shape.rows_q : 0);
  if (int64_t(workspace->size_bytes()) < ws_needed) {
    return ffi::Error::InvalidArgument(target + ": workspace has " + std::to_string(workspace->size_bytes()) +
                                       " bytes, needs " + std::to_string(ws_needed));
  }

  p.dout = dout.untyped_data();
  p.out = out.untyped_data();
  p.lse = static_cast<const float*>(lse.untyped_data());
  p.dlse = dlse ? static_cast<const float*>(dlse->untyped_data()) : nullptr;
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.dout_strides = shape.q_strides(d_v);
  p.out_strides = shape.q_strides(d_v);
  p.lse_strides = shape.lse_strides();
  p.dq_strides = shape.q_strides(d);
  p.dk_strides = shape.k_strides(d);
  p.dv_strides = shape.k_strides(d_v);
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = int64_t(workspace->size_bytes());
  p.deterministic = deterministic;

  const cudaError_t err = fn(p, stream);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(target + ": launch failed: " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_jax_bwd, Fa3Bwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .RemainingArgs()        // optional operands, announced by with_* attributes
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<int64_t>("max_seqlen_q")
                                  .Attr<int64_t>("max_seqlen_k")
                                  .Attr<bool>("deterministic")
                                  .Attr<bool>("with_dlse")
                                  .Attr<bool>("with_cu_seqlens_q")
                                  .Attr<bool>("with_cu_seqlens_k")
                                  .Attr<bool>("with_seqused_q")
                                  .Attr<bool>("with_seqused_k"),
                              {ffi::Traits::kCmdBufferCompatible});

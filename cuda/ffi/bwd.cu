// XLA FFI handler "fa3_jax_bwd": decode buffers and attributes, check what Python cannot, fill fa3::BwdParams, pick
// the compiled (dtype, d, d_v) instantiation and launch it on XLA's stream. No kernel logic here.
//
// Operands dout (b, s_q, h, d_v), q (b, s_q, h, d), k (b, s_k, h_k, d), v (b, s_k, h_k, d_v), out (b, s_q, h, d_v)
//          (bf16|f16, all the same, BSHD contiguous), lse (b, h, s_q) f32 (natural log, -inf = row sees no key);
//          then the optional operands present (optional_operands.h): dlse (b, h, s_q) f32, the cotangent of lse.
// Results  dq (b, s_q, h, d), dk (b, s_k, h_k, d), dv (b, s_k, h_k, d_v) (dtype of q), workspace (n,) u8 with
//          n = fa3::bwd_workspace_bytes(...) (contents undefined on entry; zeroed on the stream where needed).
// Attrs    softmax_scale f32 (> 0), softcap f32 (0 = off), window_left i64, window_right i64 (bottom-right aligned,
//          resolved by Python), deterministic bool (bitwise-reproducible dq/dk/dv), with_dlse bool.
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
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using fa3::handler::dims_str;

namespace fa3 {

int64_t bwd_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t /*seqlen_k*/, int64_t heads,
                            int64_t /*kv_heads*/, int64_t head_dim, int64_t /*head_dim_v*/, bool deterministic) {
  return bwd_workspace_layout(batch, seqlen_q, heads, head_dim, deterministic).total;
}

}  // namespace fa3

namespace {

using LaunchFn = cudaError_t (*)(const fa3::BwdParams&, cudaStream_t);

#define FA3_BWD_DISPATCH_ENTRY(...) FA3_SELECT_KERNEL_ENTRY(fa3::run_bwd, __VA_ARGS__)

LaunchFn select_kernel(bool is_bf16, int64_t d, int64_t dv) {
  FA3_JAX_BWD_KERNELS(FA3_BWD_DISPATCH_ENTRY)
  return nullptr;
}

using LseBuffer = ffi::Buffer<ffi::F32, 3>;
using WorkspaceBuffer = ffi::Buffer<ffi::U8, 1>;

ffi::Error Fa3Bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer dout, ffi::AnyBuffer q, ffi::AnyBuffer k,
                  ffi::AnyBuffer v, ffi::AnyBuffer out, LseBuffer lse, ffi::RemainingArgs optional,
                  ffi::Result<ffi::AnyBuffer> dq,
                  ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv_buf,
                  ffi::ResultBuffer<ffi::U8, 1> workspace, float softmax_scale, float softcap, int64_t window_left,
                  int64_t window_right, bool deterministic, bool with_dlse) {
  if (ffi::Error e = fa3::handler::check_hopper_device("fa3_jax_bwd", device); e.failure()) return e;
  std::array<std::optional<ffi::AnyBuffer>, 1> dlse;
  if (ffi::Error e = fa3::handler::decode_optional_operands("fa3_jax_bwd", optional, {with_dlse}, dlse);
      e.failure()) {
    return e;
  }

  const auto dt = q.element_type();
  if (ffi::Error e = fa3::handler::check_dtypes("fa3_jax_bwd", "q, dout, k, v, out, dq, dk, dv",
                                                {dt, dout.element_type(), k.element_type(), v.element_type(),
                                                 out.element_type(), dq->element_type(), dk->element_type(),
                                                 dv_buf->element_type()});
      e.failure()) {
    return e;
  }
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out.dimensions();
  const auto dod = dout.dimensions(), ld = lse.dimensions();
  const auto dqd = dq->dimensions(), dkd = dk->dimensions(), dvd = dv_buf->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4 || dod.size() != 4 || dqd.size() != 4 ||
      dkd.size() != 4 || dvd.size() != 4) {
    return ffi::Error::InvalidArgument("fa3_jax_bwd: dout, q, k, v, out, dq, dk, dv must be rank 4 (BSHD)");
  }
  const int64_t b = qd[0], sq = qd[1], h = qd[2], d = qd[3];
  const int64_t sk = kd[1], hk = kd[2], dv = vd[3];
  using fa3::handler::dims_equal;
  if (!dims_equal(kd, {b, sk, hk, d}) || !dims_equal(vd, {b, sk, hk, dv}) || !dims_equal(od, {b, sq, h, dv}) ||
      !dims_equal(dod, {b, sq, h, dv}) || !dims_equal(ld, {b, h, sq}) || !dims_equal(dqd, {b, sq, h, d}) ||
      !dims_equal(dkd, {b, sk, hk, d}) || !dims_equal(dvd, {b, sk, hk, dv})) {
    return ffi::Error::InvalidArgument("fa3_jax_bwd: inconsistent shapes dout" + dims_str(dod) + " q" +
                                       dims_str(qd) + " k" + dims_str(kd) + " v" + dims_str(vd) + " out" +
                                       dims_str(od) + " lse" + dims_str(ld) + " dq" + dims_str(dqd) + " dk" +
                                       dims_str(dkd) + " dv" + dims_str(dvd));
  }
  if (ffi::Error e = fa3::handler::check_problem("fa3_jax_bwd", b, sq, sk, h, hk, softmax_scale, softcap); e.failure()) {
    return e;
  }
  if (dlse[0] && (dlse[0]->element_type() != ffi::DataType::F32 || !dims_equal(dlse[0]->dimensions(), {b, h, sq}))) {
    return ffi::Error::InvalidArgument("fa3_jax_bwd: dlse must be f32 (b, h, s_q), got " +
                                       dims_str(dlse[0]->dimensions()));
  }
  const LaunchFn fn = select_kernel(dt == ffi::DataType::BF16, d, dv);
  if (fn == nullptr) {
    return ffi::Error::InvalidArgument("fa3_jax_bwd: no kernel compiled for head dims (" + std::to_string(d) + ", " +
                                       std::to_string(dv) + ")");
  }
  const int64_t ws_needed = fa3::bwd_workspace_bytes(b, sq, sk, h, hk, d, dv, deterministic);
  if (int64_t(workspace->size_bytes()) < ws_needed) {
    return ffi::Error::InvalidArgument("fa3_jax_bwd: workspace has " + std::to_string(workspace->size_bytes()) +
                                       " bytes, needs " + std::to_string(ws_needed));
  }

  fa3::BwdParams p;
  p.dout = dout.untyped_data();
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.out = out.untyped_data();
  p.lse = lse.typed_data();
  p.dlse = dlse[0] ? static_cast<const float*>(dlse[0]->untyped_data()) : nullptr;
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv_buf->untyped_data();
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = int64_t(workspace->size_bytes());
  p.batch = int(b);
  p.seqlen_q = int(sq);
  p.seqlen_k = int(sk);
  p.heads = int(h);
  p.kv_heads = int(hk);
  p.head_dim = int(d);
  p.head_dim_v = int(dv);
  p.softmax_scale = softmax_scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.window_right = window_right;
  p.deterministic = deterministic;
  p.device = device;

  const cudaError_t err = fn(p, stream);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("fa3_jax_bwd: launch failed: ") + cudaGetErrorString(err));
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
                                  .Arg<LseBuffer>()       // lse
                                  .RemainingArgs()        // optional operands, announced by with_* attributes
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<WorkspaceBuffer>()  // workspace
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right")
                                  .Attr<bool>("deterministic")
                                  .Attr<bool>("with_dlse"),
                              {ffi::Traits::kCmdBufferCompatible});

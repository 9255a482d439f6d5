// XLA FFI handler "fa3_jax_fwd": decode buffers and attributes, check what Python cannot, fill fa3::FwdParams, pick
// the compiled (dtype, d, d_v) instantiation and launch it on XLA's stream. No kernel logic here.
//
// Operands q (b, s_q, h, d), k (b, s_k, h_k, d), v (b, s_k, h_k, d_v), bf16|f16, BSHD contiguous.
// Results  out (b, s_q, h, d_v) (dtype of q), lse (b, h, s_q) f32, workspace (n,) u8 with
//          n = fa3::fwd_workspace_bytes(...) (0 today).
// Attrs    softmax_scale f32 (> 0), softcap f32 (0 = off), window_left i64, window_right i64 (bottom-right aligned,
//          already resolved by Python; see fa3/params.h).
//
// Marked kCmdBufferCompatible (docs/integration.md §2.5), so XLA may trace it into a CUDA graph: every call with
// the same shapes and attributes launches the same work; no allocation, sync or host reads of device data; TMA descriptors
// are rebuilt per call and passed by value (XLA re-traces when buffer addresses change). The one-time
// cudaFuncSetAttribute is no stream operation, so capture does not record it. tests/gpu/test_command_buffer_gpu.py
// checks that XLA puts the call into a command buffer and that replays with new inputs match graph-free runs.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "fa3/fwd_launch.h"
#include "fa3/params.h"
#include "fa3/workspace.h"
#include "fa3_kernel_list.h"
#include "handler_checks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using fa3::handler::dims_str;

namespace fa3 {

int64_t fwd_workspace_bytes(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) { return 0; }

}  // namespace fa3

namespace {

using LaunchFn = cudaError_t (*)(const fa3::FwdParams&, cudaStream_t);

#define FA3_FWD_DISPATCH_ENTRY(...) FA3_SELECT_KERNEL_ENTRY(fa3::run_fwd, __VA_ARGS__)

LaunchFn select_kernel(bool is_bf16, int64_t d, int64_t dv) {
  FA3_JAX_FWD_KERNELS(FA3_FWD_DISPATCH_ENTRY)
  return nullptr;
}

ffi::Error Fa3Fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                  ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32, 3> lse,
                  ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale, float softcap, int64_t window_left,
                  int64_t window_right) {
  if (ffi::Error e = fa3::handler::check_hopper_device("fa3_jax_fwd", device); e.failure()) return e;

  const auto dt = q.element_type();
  if (ffi::Error e = fa3::handler::check_dtypes(
          "fa3_jax_fwd", "q, k, v, out", {dt, k.element_type(), v.element_type(), out->element_type()});
      e.failure()) {
    return e;
  }
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  const auto ld = lse->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("fa3_jax_fwd: q, k, v, out must be rank 4 (BSHD)");
  }
  const int64_t b = qd[0], sq = qd[1], h = qd[2], d = qd[3];
  const int64_t sk = kd[1], hk = kd[2], dv = vd[3];
  using fa3::handler::dims_equal;
  if (!dims_equal(kd, {b, sk, hk, d}) || !dims_equal(vd, {b, sk, hk, dv}) || !dims_equal(od, {b, sq, h, dv}) ||
      !dims_equal(ld, {b, h, sq})) {
    return ffi::Error::InvalidArgument("fa3_jax_fwd: inconsistent shapes q" + dims_str(qd) + " k" + dims_str(kd) +
                                       " v" + dims_str(vd) + " out" + dims_str(od) + " lse" + dims_str(ld));
  }
  if (ffi::Error e = fa3::handler::check_problem("fa3_jax_fwd", b, sq, sk, h, hk, softmax_scale, softcap); e.failure()) {
    return e;
  }
  const LaunchFn fn = select_kernel(dt == ffi::DataType::BF16, d, dv);
  if (fn == nullptr) {
    return ffi::Error::InvalidArgument("fa3_jax_fwd: no kernel compiled for head dims (" + std::to_string(d) + ", " +
                                       std::to_string(dv) + ")");
  }
  const int64_t ws_needed = fa3::fwd_workspace_bytes(b, sq, sk, h, hk, d, dv);
  if (int64_t(workspace->size_bytes()) < ws_needed) {
    return ffi::Error::InvalidArgument("fa3_jax_fwd: workspace too small");
  }

  fa3::FwdParams p;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  // Contiguous BSHD strides, in elements.
  p.q_head_stride = d;
  p.q_row_stride = h * d;
  p.q_batch_stride = sq * h * d;
  p.k_head_stride = d;
  p.k_row_stride = hk * d;
  p.k_batch_stride = sk * hk * d;
  p.v_head_stride = dv;
  p.v_row_stride = hk * dv;
  p.v_batch_stride = sk * hk * dv;
  p.o_head_stride = dv;
  p.o_row_stride = h * dv;
  p.o_batch_stride = sq * h * dv;
  p.lse_head_stride = sq;
  p.lse_batch_stride = h * sq;
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
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = int64_t(workspace->size_bytes());
  p.device = device;

  const cudaError_t err = fn(p, stream);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("fa3_jax_fwd: launch failed: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

using LseBuffer = ffi::Buffer<ffi::F32, 3>;  // (a comma inside the macro argument would split it)

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_jax_fwd, Fa3Fwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<LseBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<float>("softmax_scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window_left")
                                  .Attr<int64_t>("window_right"),
                              {ffi::Traits::kCmdBufferCompatible});

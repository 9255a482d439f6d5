// The nanobind module `fa3_jax._fa3_jax_cuda`: hands Python the XLA FFI handler capsules, the workspace sizes
// the handlers expect, and what this build contains. Python registers the capsules (fa3_jax/_extension.py);
// nothing here touches the GPU, so the module imports on machines without a driver.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstdint>

#include "fa3/workspace.h"
#include "fa3_kernel_list.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

#ifdef FA3_JAX_HAS_FWD
extern "C" XLA_FFI_Error* fa3_jax_fwd(XLA_FFI_CallFrame* call_frame);
#endif
#ifdef FA3_JAX_HAS_BWD
extern "C" XLA_FFI_Error* fa3_jax_bwd(XLA_FFI_CallFrame* call_frame);
#endif
extern "C" XLA_FFI_Error* fa3_jax_segment_layout(XLA_FFI_CallFrame* call_frame);

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// One (dtype, head_dim, head_dim_v) tuple per compiled kernel, e.g. ("bf16", 128, 128).
#define FA3_JAX_APPEND_KERNEL(Element, dtype, hdim, hdimv) out.append(nb::make_tuple(#dtype, hdim, hdimv));

nb::list fwd_kernels() {
  nb::list out;
  FA3_JAX_FWD_KERNELS(FA3_JAX_APPEND_KERNEL)
  return out;
}

nb::list bwd_kernels() {
  nb::list out;
  FA3_JAX_BWD_KERNELS(FA3_JAX_APPEND_KERNEL)
  return out;
}

}  // namespace

NB_MODULE(_fa3_jax_cuda, m) {
  m.def("registrations", []() {
    nb::dict targets;
#ifdef FA3_JAX_HAS_FWD
    targets["fa3_jax_fwd"] = handler_capsule(fa3_jax_fwd);
#endif
#ifdef FA3_JAX_HAS_BWD
    targets["fa3_jax_bwd"] = handler_capsule(fa3_jax_bwd);
#endif
    targets["fa3_jax_segment_layout"] = handler_capsule(fa3_jax_segment_layout);
    return targets;
  }, "XLA FFI target name -> handler capsule, for jax.ffi.register_ffi_target(platform='CUDA').");

  m.def("build_info", []() {
    nb::dict info;
    info["xla_ffi_api"] = nb::make_tuple(XLA_FFI_API_MAJOR, FA3_JAX_FFI_API_MINOR);
    info["cutlass_version"] = FA3_JAX_CUTLASS_VERSION;
    info["cuda_version"] = FA3_JAX_CUDA_VERSION;
    info["fwd_kernels"] = fwd_kernels();
    info["bwd_kernels"] = bwd_kernels();
    return info;
  }, "What this build contains: FFI API version, CUTLASS and CUDA versions, compiled (dtype, d, d_v) per direction.");

#ifdef FA3_JAX_HAS_FWD
  m.def("fwd_workspace_bytes", &fa3::fwd_workspace_bytes, nb::arg("batch"), nb::arg("seqlen_q"),
        nb::arg("seqlen_k"), nb::arg("heads"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("head_dim_v"),
        nb::arg("varlen") = false, nb::arg("num_splits") = 1,
        "Bytes of the workspace result that fa3_jax_fwd expects.");
#endif
#ifdef FA3_JAX_HAS_BWD
  m.def("bwd_workspace_bytes", &fa3::bwd_workspace_bytes, nb::arg("batch"), nb::arg("seqlen_q"),
        nb::arg("seqlen_k"), nb::arg("heads"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("head_dim_v"),
        nb::arg("deterministic"), nb::arg("total_q") = 0, "Bytes of the workspace result that fa3_jax_bwd expects.");
#endif
  m.def("segment_layout_workspace_bytes", &fa3::segment_layout_workspace_bytes, nb::arg("rows"), nb::arg("seqlen"),
        "Bytes of the workspace result that fa3_jax_segment_layout expects.");
}

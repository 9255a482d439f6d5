// Checks shared by the FFI handlers: the device (cached per ordinal) and the problem sizes, with messages that name
// the target. Host-only; included by cuda/ffi/*.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <string>

#include "fa3/launch_setup.h"
#include "xla/ffi/api/ffi.h"

namespace fa3::handler {

namespace ffi = xla::ffi;

struct DeviceInfo {
  cudaError_t err = cudaSuccess;
  int major = 0, minor = 0;
};

// Read once per device, never per call (device queries are slow); inline, so one cache serves every handler.
inline const DeviceInfo& device_info(int device) {
  static std::once_flag once[kMaxDevices];
  static DeviceInfo info[kMaxDevices];
  std::call_once(once[device], [device] {
    DeviceInfo& d = info[device];
    d.err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device);
    if (d.err == cudaSuccess) d.err = cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, device);
  });
  return info[device];
}

// Success iff `device` is a compute capability 9.0 GPU: the kernels are built for sm_90a only.
inline ffi::Error check_hopper_device(const std::string& target, int32_t device) {
  if (device < 0 || device >= kMaxDevices) return ffi::Error::InvalidArgument(target + ": bad device ordinal");
  const DeviceInfo& dev = device_info(device);
  if (dev.err != cudaSuccess) {
    return ffi::Error::Internal(target + ": cudaDeviceGetAttribute failed: " + cudaGetErrorString(dev.err));
  }
  if (dev.major != 9 || dev.minor != 0) {
    return ffi::Error::InvalidArgument(target + ": needs a compute capability 9.0 GPU (H100/H200), got " +
                                       std::to_string(dev.major) + "." + std::to_string(dev.minor));
  }
  return ffi::Error::Success();
}

// Longest sequence the kernels take (fa3_jax/_validate.py MAX_SEQLEN, checked there at trace time): the mask and
// block-range arithmetic (fa3/visibility.h) stays within int32 up to that length.
constexpr int64_t kMaxSeqlen = int64_t(1) << 29;

// Success iff the sizes and scalars are ones Python is supposed to guarantee (re-checked cheaply here). Batch and
// head counts have no limit of their own: every grid is 1-D, and tile counts fit in int32 for any tensor that fits
// in GPU memory.
inline ffi::Error check_problem(const std::string& target, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                int64_t heads, int64_t kv_heads, float softmax_scale, float softcap) {
  if (batch < 1 || seqlen_q < 1 || seqlen_k < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument(target + ": need batch, seqlens, heads >= 1 and heads % kv_heads == 0");
  }
  if (seqlen_q > kMaxSeqlen || seqlen_k > kMaxSeqlen || batch > INT32_MAX || heads > INT32_MAX) {
    return ffi::Error::InvalidArgument(target + ": need seqlens <= 2^29 and batch, heads < 2^31");
  }
  if (!(softmax_scale > 0.f) || !(softcap >= 0.f)) {
    return ffi::Error::InvalidArgument(target + ": need softmax_scale > 0 and softcap >= 0");
  }
  return ffi::Error::Success();
}

// Success iff the buffers' element types (listed in the order `names` gives) are one type, bfloat16 or float16.
inline ffi::Error check_dtypes(const std::string& target, const std::string& names,
                               std::initializer_list<ffi::DataType> dtypes) {
  const ffi::DataType first = *dtypes.begin();
  bool same = true;
  for (ffi::DataType t : dtypes) same = same && t == first;
  if (!same || (first != ffi::DataType::BF16 && first != ffi::DataType::F16)) {
    return ffi::Error::InvalidArgument(target + ": " + names + " must share one dtype, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

inline std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + ")";
}


}  // namespace fa3::handler

// One entry of a kernel-list X-macro (fa3_kernel_list.h) inside a handler's
// `LaunchFn select_kernel(bool is_bf16, int64_t d, int64_t dv)`: returns &run<Element, hdim, hdimv> when the entry
// matches. Each handler binds `run` (fa3::run_fwd, fa3::run_bwd) in a one-line macro of its own.
#define FA3_SELECT_KERNEL_ENTRY(run, Element, dtype_name, hdim, hdimv)                     \
  if (is_bf16 == (std::string(#dtype_name) == "bf16") && d == hdim && dv == hdimv) {       \
    return &run<Element, hdim, hdimv>;                                                     \
  }

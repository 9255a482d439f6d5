// One-time per-device launch setup shared by the forward and backward launchers: the dynamic-SMEM opt-in (a property
// of a kernel function on one device) and the device's SM count. Device queries and attribute calls are slow, so
// each happens once per (kernel, device), never per call; both are host calls, not stream operations, so a CUDA
// graph capture of the launch does not record them.
#pragma once

#include <cuda_runtime_api.h>

#include <mutex>

#include "fa3/params.h"

namespace fa3 {

struct LaunchSetup {
  cudaError_t err = cudaSuccess;
  int num_sms = 0;
};

// kKernel: the __global__ function (one cache per kernel instantiation); device: a CUDA ordinal < kMaxDevices.
template <auto kKernel>
const LaunchSetup& launch_setup(int smem_bytes, int device) {
  static std::once_flag once[kMaxDevices];
  static LaunchSetup setup[kMaxDevices];
  std::call_once(once[device], [&] {
    LaunchSetup& s = setup[device];
    s.err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (s.err == cudaSuccess) s.err = cudaDeviceGetAttribute(&s.num_sms, cudaDevAttrMultiProcessorCount, device);
  });
  return setup[device];
}

}  // namespace fa3

// Light declaration of the forward entry point (no CuTe/CUTLASS includes), for the FFI handler and tests.
//
// run_fwd<Element, kHeadDim, kHeadDimV> is explicitly instantiated once per (dtype, head-dim pair) in the TUs that
// CMake generates from cuda/kernels/fwd.cu.in; its definition lives in fa3/fwd_launch.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include "fa3/params.h"

namespace cutlass {
struct half_t;
struct bfloat16_t;
}  // namespace cutlass

namespace fa3 {

// Launches the forward kernel on `stream` (after clearing the rows no sequence covers, docs/kernels.md §10.3). No
// allocation, no synchronisation. The caller guarantees: compute capability 9.0; fa3::valid_problem; head dims match
// the instantiation; 16-byte aligned pointers and row strides that are multiples of 8 elements; softmax_scale > 0.
// Returns the first CUDA error (cudaFuncSetAttribute or launch), else cudaSuccess.
template <class Element, int kHeadDim, int kHeadDimV>
cudaError_t run_fwd(const FwdParams& params, cudaStream_t stream);

}  // namespace fa3

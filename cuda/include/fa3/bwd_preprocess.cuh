// Backward preprocess (KERNELS.md §4.3 (1)): D = rowsum(dO * O) in fp32 and lse * log2(e), both per (b, h, row)
// with rows padded to whole M-blocks. lse = -inf (row sees no key) becomes 0 so that masked scores give
// exp2(-inf - 0) = 0 rather than NaN; padding rows get lse = +inf and D = 0, so P = 0 there without a row mask.
// The dQ accumulator and semaphores are zeroed by cudaMemsetAsync in run_bwd.
#pragma once

#include <cmath>

#include "cutlass/numeric_types.h"

namespace fa3 {
namespace bwd {

// One warp per (b, h, padded row); 8 warps per block. Each lane reads 16 bytes of dO and O per step.
template <class Element, int kHeadDimV>
__global__ void __launch_bounds__(256) bwd_preprocess_kernel(const Element* __restrict__ dout,
                                                             const Element* __restrict__ out,
                                                             const float* __restrict__ lse, float* __restrict__ lse_log2,
                                                             float* __restrict__ dsum, int seqlen_q, int heads,
                                                             int rows_padded, long long total_rows) {
  const long long r = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
  if (r >= total_rows) return;
  const int lane = threadIdx.x & 31;
  const int i = int(r % rows_padded);
  const long long bh = r / rows_padded;
  const int h = int(bh % heads);
  const long long b = bh / heads;
  float acc = 0.f;
  if (i < seqlen_q) {
    const long long base = ((b * seqlen_q + i) * heads + h) * kHeadDimV;
    for (int c = lane * 8; c < kHeadDimV; c += 256) {
      const uint4 a = *reinterpret_cast<const uint4*>(dout + base + c);
      const uint4 o = *reinterpret_cast<const uint4*>(out + base + c);
      const Element* ae = reinterpret_cast<const Element*>(&a);
      const Element* oe = reinterpret_cast<const Element*>(&o);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += float(ae[e]) * float(oe[e]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    dsum[r] = acc;
    float l = INFINITY;
    if (i < seqlen_q) {
      const float x = lse[bh * seqlen_q + i];
      l = x == -INFINITY ? 0.f : x * 1.4426950408889634f;
    }
    lse_log2[r] = l;
  }
}

}  // namespace bwd
}  // namespace fa3

// Backward preprocess (docs/kernels.md §3.2): D = rowsum(dO * O) - dlse in fp32 and lse * log2(e), both per
// (b, h, row) with rows padded to whole M-blocks, and the row's slice of the fp32 dQ accumulator set to zero. lse = -inf (row sees
// no key) becomes 0 so that masked scores give exp2(-inf - 0) = 0 rather than NaN; padding rows get lse = +inf and
// D = 0, so P = 0 there without a row mask. dlse, the cotangent of lse (optional, nullptr when lse was not
// differentiated), enters only here: d lse / d S = P, so it shifts every dS = P * (dP - D) of its row by P * dlse,
// which is D - dlse in place of D. (The deterministic mode's semaphores are zeroed by cudaMemsetAsync.)
#pragma once

#include <cmath>

#include "cutlass/numeric_types.h"

namespace fa3 {
namespace bwd {

// 8 lanes per (b, h, padded row), 32 rows per 256-thread block. Each lane keeps several 16-byte loads of dO and O in
// flight (d_v / 64 of each), so the read stream runs near HBM bandwidth (one warp per row with 16-byte lanes left half
// the warp idle at d_v = 128 and ran at about half of it: NOTES_bwd.md v7). Row r of the accumulator is the contiguous
// d floats at r * d: M-block tiles are stored in the padded-row order (bwd_launch.h), whatever the order inside one.
constexpr int kPreprocessLanesPerRow = 8;
constexpr int kPreprocessRowsPerBlock = 256 / kPreprocessLanesPerRow;

template <class Element, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(256) bwd_preprocess_kernel(const Element* __restrict__ dout,
                                                             const Element* __restrict__ out,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ dlse, float* __restrict__ lse_log2,
                                                             float* __restrict__ dsum, float* __restrict__ dq_accum,
                                                             int seqlen_q, int heads, int rows_padded,
                                                             long long total_rows) {
  constexpr int kLanes = kPreprocessLanesPerRow;
  const long long r = (long long)blockIdx.x * kPreprocessRowsPerBlock + threadIdx.x / kLanes;
  if (r >= total_rows) return;  // whole warps: total_rows is a multiple of kBlockM (64), so the shuffles below are safe
  const int sub = threadIdx.x % kLanes;
  const int i = int(r % rows_padded);
  const long long bh = r / rows_padded;
  const int h = int(bh % heads);
  const long long b = bh / heads;

  float4* dq_row = reinterpret_cast<float4*>(dq_accum + r * kHeadDim);
#pragma unroll
  for (int c = sub; c < kHeadDim / 4; c += kLanes) dq_row[c] = make_float4(0.f, 0.f, 0.f, 0.f);

  float acc = 0.f;
  if (i < seqlen_q) {
    const long long base = ((b * seqlen_q + i) * heads + h) * kHeadDimV;
    constexpr int kChunks = kHeadDimV / 8;  // 16-byte chunks per row
    constexpr int kPerLane = (kChunks + kLanes - 1) / kLanes;
    uint4 a[kPerLane], o[kPerLane];  // all loads first, then the arithmetic
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const bool in = k * kLanes + sub < kChunks;
      a[k] = in ? *reinterpret_cast<const uint4*>(dout + base + (k * kLanes + sub) * 8) : uint4{0, 0, 0, 0};
      o[k] = in ? *reinterpret_cast<const uint4*>(out + base + (k * kLanes + sub) * 8) : uint4{0, 0, 0, 0};
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const Element* ae = reinterpret_cast<const Element*>(&a[k]);
      const Element* oe = reinterpret_cast<const Element*>(&o[k]);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += float(ae[e]) * float(oe[e]);
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (sub == 0) {
    float l = INFINITY;
    if (i < seqlen_q) {
      const float x = lse[bh * seqlen_q + i];
      l = x == -INFINITY ? 0.f : x * 1.4426950408889634f;
      if (dlse != nullptr) acc -= dlse[bh * seqlen_q + i];
    }
    dsum[r] = acc;
    lse_log2[r] = l;
  }
}

}  // namespace bwd
}  // namespace fa3

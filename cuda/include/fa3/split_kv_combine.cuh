// Split-KV combine (docs/kernels.md §2.10): merges the splits' partial O and LSE (fa3/split_kv.h) into out and lse.
//
// One warp per (query row, head): the lanes read the splits' LSEs, reduce their maximum and the sum of exp(LSE_s -
// max), then each lane accumulates four consecutive columns of sum_s exp(LSE_s - LSE) O_s (16-byte loads) and
// stores them in out's dtype. Rows whose splits all saw no key get O = 0 and LSE = -inf, as the unsplit forward
// writes them. A grid-stride loop over rows x heads: no grid limit for any problem size.
#pragma once

#include <cmath>
#include <cstdint>

#include "fa3/params.h"
#include "fa3/split_kv.h"

namespace fa3 {

struct CombineArgs {
  SplitPartials parts;
  void* out;  // Element, out_strides
  float* lse;
  Strides out_strides, lse_strides;
  int batch, seqlen_q, heads, head_dim_v;  // BSHD queries: rows are (batch, seqlen_q)
};

template <class Element>
__global__ void __launch_bounds__(256) split_kv_combine_kernel(CombineArgs const args) {
  const int lane = int(threadIdx.x % 32);
  const int64_t items = int64_t(args.batch) * args.seqlen_q * args.heads;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const SplitPartials& parts = args.parts;
  for (int64_t item = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; item < items; item += warps) {
    const int h = int(item % args.heads);
    const int64_t bi = item / args.heads;
    const int i = int(bi % args.seqlen_q);
    const int b = int(bi / args.seqlen_q);
    const int64_t lse_at = b * args.lse_strides.batch + h * args.lse_strides.head + i * args.lse_strides.row;
    const int64_t out_at = b * args.out_strides.batch + i * args.out_strides.row + h * args.out_strides.head;

    float top = -INFINITY;
    for (int s = lane; s < parts.count; s += 32) top = fmaxf(top, parts.lse[s * parts.lse_split + lse_at]);
    for (int d = 16; d > 0; d /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, d));
    float sum = 0.f;
    if (top != -INFINITY) {
      for (int s = lane; s < parts.count; s += 32) sum += __expf(parts.lse[s * parts.lse_split + lse_at] - top);
    }
    for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
    const float lse = sum > 0.f ? top + __logf(sum) : -INFINITY;

    Element* out = static_cast<Element*>(args.out) + out_at;
    for (int c = 4 * lane; c < args.head_dim_v; c += 128) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      if (lse != -INFINITY) {
        for (int s = 0; s < parts.count; ++s) {
          const float w = __expf(parts.lse[s * parts.lse_split + lse_at] - lse);  // 0 for an empty split
          const float4 o = *reinterpret_cast<const float4*>(parts.out + s * parts.out_split + out_at + c);
          acc.x += w * o.x, acc.y += w * o.y, acc.z += w * o.z, acc.w += w * o.w;
        }
      }
      alignas(8) Element v[4] = {Element(acc.x), Element(acc.y), Element(acc.z), Element(acc.w)};
      *reinterpret_cast<uint2*>(out + c) = *reinterpret_cast<const uint2*>(v);
    }
    if (lane == 0) args.lse[lse_at] = lse;
  }
}

// Launches the combine on `stream` with at most 8 blocks per SM (the loop covers the rest).
template <class Element>
cudaError_t launch_split_kv_combine(CombineArgs const& args, int num_sms, cudaStream_t stream) {
  constexpr int kWarpsPerBlock = 8;
  const int64_t items = int64_t(args.batch) * args.seqlen_q * args.heads;
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = int64_t(num_sms) * 8;
  split_kv_combine_kernel<Element><<<unsigned(blocks < cap ? blocks : cap), 32 * kWarpsPerBlock, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fa3

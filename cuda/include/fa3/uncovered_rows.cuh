// Rows that belong to no sequence (fa3/sequences.h: gaps between packed sequences, rows past cu[batch], rows
// beyond a sequence's used length) are written by no tile of the main kernels, yet must read out = 0, lse = -inf,
// dq = dk = dv = 0. clear_uncovered_rows writes those values into the rows no sequence covers, a warp per row. The
// forward runs it in its otherwise idle producer warps, beside the tiles (fwd_kernel.cuh); the backward launches it
// as a kernel before its main kernel. Either way a row is written by the clearing or by tiles, never by neither, so
// ill-formed cu values (where the coverage test below may be wrong) can leave zeros in a row, never stale memory.
// Uniform sides have no such rows and skip it (docs/kernels.md §10.3).
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "fa3/params.h"
#include "fa3/sequences.h"

namespace fa3 {

// Up to two 16-bit tensors of one side (dk and dv share the keys' rows) and an optional row statistic (lse).
struct UncoveredRows {
  struct Tensor {
    void* data = nullptr;  // (batch, rows, heads, dim) or packed (rows, heads, dim); nullptr: none
    Strides strides;
    int dim = 0;  // multiple of 8: whole 16-byte chunks
  };
  SeqSide side;
  int batch = 0, heads = 0;
  Tensor tensors[2];
  float* stat = nullptr;  // (batch, heads, rows) or packed (heads, rows), set to -inf; nullptr: none
  Strides stat_strides;
};

constexpr int kUncoveredRowsPerBlock = 8;  // one warp per row

// Whether row `row` of batch entry b (packed: of the tensor, b ignored) belongs to a sequence; called by a whole
// warp.
__device__ __forceinline__ bool row_covered(SeqSide const& side, int batch, int b, int row) {
  int offset, length;
  if (side.packed()) b = side.last_starting_at_warp(row, batch);
  side.extent(b, offset, length);
  return row >= offset && row < offset + length;
}

// The row slots of the side: batch * rows (BSHD) or the packed tensor's rows.
__host__ __device__ __forceinline__ long long uncovered_row_slots(UncoveredRows const& args) {
  return args.side.packed() ? args.side.rows : (long long)args.batch * args.side.rows;
}

// Clears the uncovered ones among row slots first, first + stride, ...: every lane of a warp calls it with the same
// arguments.
__device__ __forceinline__ void clear_uncovered_rows(UncoveredRows const& args, long long first, long long stride) {
  if (args.side.uniform()) return;
  const int rows = args.side.rows, lane = int(threadIdx.x % 32);
  for (long long slot = first; slot < uncovered_row_slots(args); slot += stride) {
    const int b = int(slot / rows), row = int(slot % rows);
    if (row_covered(args.side, args.batch, b, row)) continue;  // the same answer in all lanes of the warp
    for (const UncoveredRows::Tensor& t : args.tensors) {
      if (t.data == nullptr) continue;
      const int chunks = t.dim / 8;
      uint16_t* base = static_cast<uint16_t*>(t.data) + b * t.strides.batch + int64_t(row) * t.strides.row;
      for (int idx = lane; idx < args.heads * chunks; idx += 32) {
        const int h = idx / chunks, c = idx % chunks;
        *reinterpret_cast<uint4*>(base + h * t.strides.head + c * 8) = uint4{0, 0, 0, 0};
      }
    }
    if (args.stat != nullptr) {
      float* base = args.stat + b * args.stat_strides.batch + row;
      for (int h = lane; h < args.heads; h += 32) base[h * args.stat_strides.head] = -INFINITY;
    }
  }
}

// A template only so that every translation unit including this header may define it.
template <int kRowsPerBlock>
__global__ void __launch_bounds__(32 * kRowsPerBlock) clear_uncovered_rows_kernel(UncoveredRows args) {
  clear_uncovered_rows(args, (long long)blockIdx.x * kRowsPerBlock + threadIdx.x / 32, uncovered_row_slots(args));
}

// Launches the clearing on `stream` when the side has uncovered rows at all (a non-uniform side).
inline cudaError_t clear_uncovered_rows(UncoveredRows const& args, cudaStream_t stream) {
  if (args.side.uniform()) return cudaSuccess;
  const long long blocks = (uncovered_row_slots(args) + kUncoveredRowsPerBlock - 1) / kUncoveredRowsPerBlock;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  constexpr int kThreads = 32 * kUncoveredRowsPerBlock;
  clear_uncovered_rows_kernel<kUncoveredRowsPerBlock><<<unsigned(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fa3

// Rows that belong to no sequence (fa3/sequences.h: gaps between packed sequences, rows past cu[batch], rows
// beyond a sequence's used length) are written by no tile of the main kernels, yet must read out = 0, lse = -inf,
// dq = dk = dv = 0. This kernel writes those values into the rows no sequence covers. The launchers run it before
// the main kernel of the same tensors, so ill-formed cu values (where the coverage test below may be wrong) can
// only leave zeros that the main kernel overwrites, never stale memory. Uniform sides have no such rows and skip it
// (docs/kernels.md §10.3).
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

// Whether row `row` of batch entry b (packed: of the tensor, b ignored) belongs to a sequence.
__device__ __forceinline__ bool row_covered(SeqSide const& side, int batch, int b, int row) {
  int offset, length;
  if (side.packed()) b = side.last_starting_at(row, batch);
  side.extent(b, offset, length);
  return row >= offset && row < offset + length;
}

// A template only so that every translation unit including this header may define it.
template <int kRowsPerBlock>
__global__ void __launch_bounds__(32 * kRowsPerBlock) clear_uncovered_rows_kernel(UncoveredRows args) {
  const long long slot = (long long)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int rows = args.side.rows;
  const long long slots = args.side.packed() ? rows : (long long)args.batch * rows;
  if (slot >= slots) return;
  const int b = int(slot / rows), row = int(slot % rows);
  if (row_covered(args.side, args.batch, b, row)) return;  // the same answer in all lanes of the warp
  const int lane = threadIdx.x % 32;
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

// Launches the clearing on `stream` when the side has uncovered rows at all (a non-uniform side).
inline cudaError_t clear_uncovered_rows(UncoveredRows const& args, cudaStream_t stream) {
  if (args.side.uniform()) return cudaSuccess;
  const long long slots = args.side.packed() ? args.side.rows : (long long)args.batch * args.side.rows;
  const long long blocks = (slots + kUncoveredRowsPerBlock - 1) / kUncoveredRowsPerBlock;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  constexpr int kThreads = 32 * kUncoveredRowsPerBlock;
  clear_uncovered_rows_kernel<kUncoveredRowsPerBlock><<<unsigned(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fa3

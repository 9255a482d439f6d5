// Segment ids -> the packed sequence layout of a batch's rows laid back to back, on the device, in two small kernels
// (docs/integration.md §4.9 gives the semantics; fa3_jax/_segments.py is the XLA definition it must match exactly).
//
// Row r of ids (rows, seqlen) holds runs of one non-negative id (segments); negative ids are padding. The result is
// the layout of rows * max_segments sequences over the (rows * seqlen) packed tokens: first every row's runs in
// order (the first max_segments of each row; later ones are dropped), sequence = run, cu_seqlens = its first token,
// seqused = its length; then the empty slots, at offset rows * seqlen with length 0, so that the kernels' walks stop
// at them (docs/kernels.md §10.2). cu_seqlens[rows * max_segments] = rows * seqlen.
//
// Pass 1 counts each row's runs (a CTA per row). Pass 2 (a CTA per row) sums the kept runs of the rows before its
// own for its first slot, then ranks the run starts of its row chunk by chunk with a block scan. Both grids are 1-D
// over rows, so no grid limit is reached before the int32 token count is. No atomics, no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace fa3::segments {

struct SegmentLayoutArgs {
  const int32_t* ids;   // (rows, seqlen)
  int32_t* runs;        // (rows): pass 1's run counts
  int32_t* cu_seqlens;  // (rows * max_segments + 1)
  int32_t* seqused;     // (rows * max_segments)
  int rows, seqlen, max_segments;
};

constexpr int kThreads = 256;
constexpr int kIdsPerThread = 16;  // one chunk of pass 2 is kThreads * kIdsPerThread consecutive ids
static_assert(kIdsPerThread <= 32, "a thread keeps its run starts in one 32-bit mask");

__device__ __forceinline__ bool starts_run(const int32_t* row, int t) {
  return row[t] >= 0 && (t == 0 || row[t - 1] != row[t]);
}

__device__ __forceinline__ bool ends_run(const int32_t* row, int t, int seqlen) {
  return row[t] >= 0 && (t == seqlen - 1 || row[t + 1] != row[t]);
}

__global__ void __launch_bounds__(kThreads) count_runs(const SegmentLayoutArgs args) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage reduce;
  const int64_t row_index = blockIdx.x;
  const int32_t* row = args.ids + row_index * args.seqlen;
  int n = 0;
  for (int t = threadIdx.x; t < args.seqlen; t += kThreads) n += starts_run(row, t);
  n = Reduce(reduce).Sum(n);
  if (threadIdx.x == 0) args.runs[row_index] = n;
}

__global__ void __launch_bounds__(kThreads) write_layout(const SegmentLayoutArgs args) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int64_t shared_before, shared_real;
  const int r = int(blockIdx.x), m = args.max_segments;
  const int64_t slots = int64_t(args.rows) * m;
  const int32_t* runs = args.runs;
  const int32_t* row = args.ids + int64_t(r) * args.seqlen;
  int32_t* cu = args.cu_seqlens;
  int32_t* used = args.seqused;
  const int32_t total = args.rows * args.seqlen;  // fits: the handler checks rows * seqlen < 2^31
  const int32_t row_start = r * args.seqlen;

  // This row's first slot (the kept runs of the rows before it) and the real slots of all rows.
  int64_t before = 0, real = 0;
  for (int i = threadIdx.x; i < args.rows; i += kThreads) {
    const int kept = min(runs[i], m);
    real += kept;
    if (i < r) before += kept;
  }
  before = Reduce(tmp.reduce).Sum(before);
  __syncthreads();
  real = Reduce(tmp.reduce).Sum(real);
  if (threadIdx.x == 0) shared_before = before, shared_real = real;
  __syncthreads();
  before = shared_before, real = shared_real;

  int carry = 0;  // the row's runs that start in earlier chunks
  for (int chunk = 0; chunk < args.seqlen; chunk += kThreads * kIdsPerThread) {
    const int first = chunk + threadIdx.x * kIdsPerThread;
    uint32_t start_mask = 0;
    int starts = 0;
    for (int i = 0; i < kIdsPerThread; ++i) {
      if (first + i < args.seqlen && starts_run(row, first + i)) start_mask |= 1u << i, ++starts;
    }
    int rank, chunk_runs;  // rank: the runs starting before this thread's ids
    Scan(tmp.scan).ExclusiveSum(starts, rank, chunk_runs);
    rank += carry;
    int run = rank;
    for (int i = 0; i < kIdsPerThread; ++i) {
      if ((start_mask >> i & 1u) && run++ < m) cu[before + run - 1] = row_start + first + i;
    }
    __syncthreads();  // every start of this chunk is written before the lengths below read them
    run = rank;       // runs started at or before id i, once i is counted
    for (int i = 0; i < kIdsPerThread; ++i) {
      const int t = first + i;
      run += start_mask >> i & 1u;
      if (t < args.seqlen && run - 1 < m && ends_run(row, t, args.seqlen)) {
        used[before + run - 1] = row_start + t + 1 - cu[before + run - 1];
      }
    }
    carry += chunk_runs;
    __syncthreads();  // the scan's storage is reused by the next chunk
  }

  // The row's empty slots, after all real ones: the rows before it left r * m - before of them.
  const int kept = min(carry, m);
  const int64_t empty = real + int64_t(r) * m - before;
  for (int e = threadIdx.x; e < m - kept; e += kThreads) cu[empty + e] = total, used[empty + e] = 0;
  if (r == args.rows - 1 && threadIdx.x == 0) cu[slots] = total;
}

// Returns the first launch error. rows >= 1 (the handler checks).
inline cudaError_t run_segment_layout(const SegmentLayoutArgs& args, cudaStream_t stream) {
  const unsigned grid = unsigned(args.rows);
  count_runs<<<grid, kThreads, 0, stream>>>(args);
  write_layout<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fa3::segments

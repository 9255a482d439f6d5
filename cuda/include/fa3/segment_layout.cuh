// Segment ids -> the packed sequence layout of a batch's rows laid back to back, on the device, in three small
// kernels (docs/integration.md §4.9 gives the semantics; fa3_jax/_segments.py is the XLA definition it must match
// exactly).
//
// Row r of ids (rows, seqlen) holds runs of one non-negative id (segments); negative ids are padding. The result is
// the layout of rows * max_segments sequences over the (rows * seqlen) packed tokens: first every row's runs in
// order (the first max_segments of each row; later ones are dropped), sequence = run, cu_seqlens = its first token,
// seqused = its length; then the empty slots, at offset rows * seqlen with length 0, so that the kernels' walks stop
// at them (docs/kernels.md §10.2). cu_seqlens[rows * max_segments] = rows * seqlen.
//
// Each row is cut into chunks of kChunk ids, and every pass but the middle one runs a CTA per chunk, so the
// derivation costs a few microseconds whatever the shape of the batch (a CTA per row left one CTA to walk a long
// row alone):
//   1. count_chunks: each chunk's run starts and its last run start;
//   2. scan_chunks (one CTA): the run starts before each chunk, the last run start before each chunk, and each
//      row's first slot (the kept runs of the rows before it);
//   3. write_layout: each chunk ranks its run starts (a block scan on top of pass 2's prefix) and writes the
//      offsets, and the lengths of the runs that end in it (a run's start may lie in an earlier chunk: pass 2
//      carries it), then its share of the row's empty slots.
// The grids are 1-D over chunks, fewer than 2^31 because the ids are; no atomics, no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace fa3::segments {

constexpr int kThreads = 256;
constexpr int kIdsPerThread = 16;
constexpr int kChunk = kThreads * kIdsPerThread;  // ids per CTA of passes 1 and 3
constexpr int kScanThreads = 1024;
static_assert(kIdsPerThread <= 32, "a thread keeps its run starts in one 32-bit mask");

// The chunks of a (rows, seqlen) ids array and the workspace the derivation needs (host and device).
struct Chunks {
  int rows, seqlen;
  __host__ __device__ int per_row() const { return (seqlen + kChunk - 1) / kChunk; }
  __host__ __device__ int64_t count() const { return int64_t(rows) * per_row(); }
  // int32 words: run starts before each chunk (count + 1), last start before each chunk (count), first slot of
  // each row (rows + 1).
  __host__ __device__ int64_t workspace_words() const { return 2 * count() + rows + 2; }
};

struct SegmentLayoutArgs {
  const int32_t* ids;   // (rows, seqlen)
  int32_t* workspace;   // Chunks::workspace_words()
  int32_t* cu_seqlens;  // (rows * max_segments + 1)
  int32_t* seqused;     // (rows * max_segments)
  int rows, seqlen, max_segments;

  __host__ __device__ Chunks chunks() const { return Chunks{rows, seqlen}; }
  // The workspace's three arrays (token positions are flat indices into ids, the packed rows).
  __device__ int32_t* starts_before() const { return workspace; }
  __device__ int32_t* last_start_before() const { return workspace + chunks().count() + 1; }
  __device__ int32_t* row_first_slot() const { return workspace + 2 * chunks().count() + 1; }
};

struct Max {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// One thread's kIdsPerThread consecutive ids of its chunk, held in registers with a neighbour on each side
// (padding, -1, beyond the row's ends): which of them start a run, and the flat position of the last start.
struct ThreadIds {
  int first;         // the thread's first id within the row
  int row_start;     // flat position of the row's first id
  int id[kIdsPerThread + 2];  // id[i + 1] = ids[first + i]; id[0] and id[kIdsPerThread + 1] the neighbours
  uint32_t start_mask = 0;
  int starts = 0, last_start = -1;  // -1: none

  __device__ ThreadIds(SegmentLayoutArgs const& args, int64_t chunk) {
    const int per_row = args.chunks().per_row();
    const int r = int(chunk / per_row);
    row_start = r * args.seqlen;
    first = int(chunk % per_row) * kChunk + int(threadIdx.x) * kIdsPerThread;
    const int32_t* row = args.ids + row_start;
    auto at = [&](int t) { return t >= 0 && t < args.seqlen ? row[t] : -1; };
    id[0] = at(first - 1);
    id[kIdsPerThread + 1] = at(first + kIdsPerThread);
    // Whole 16-byte loads where the thread's ids are aligned and inside the row (all but a row's last thread when
    // seqlen is a multiple of 4), else one id at a time.
    if (first + kIdsPerThread <= args.seqlen && reinterpret_cast<uintptr_t>(row + first) % 16 == 0) {
      for (int i = 0; i < kIdsPerThread; i += 4) {
        const int4 v = *reinterpret_cast<const int4*>(row + first + i);
        id[i + 1] = v.x, id[i + 2] = v.y, id[i + 3] = v.z, id[i + 4] = v.w;
      }
    } else {
      for (int i = 0; i < kIdsPerThread; ++i) id[i + 1] = at(first + i);
    }
    for (int i = 0; i < kIdsPerThread; ++i) {
      if (starts_run(i)) start_mask |= 1u << i, ++starts, last_start = row_start + first + i;
    }
  }
  // Whether the thread's id i starts / ends a run of one non-negative id.
  __device__ bool starts_run(int i) const { return id[i + 1] >= 0 && id[i + 1] != id[i]; }
  __device__ bool ends_run(int i) const { return id[i + 1] >= 0 && id[i + 2] != id[i + 1]; }
};

__global__ void __launch_bounds__(kThreads) count_chunks(const SegmentLayoutArgs args) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const ThreadIds mine(args, blockIdx.x);
  const int starts = Reduce(tmp).Sum(mine.starts);
  __syncthreads();
  const int last = Reduce(tmp).Reduce(mine.last_start, Max());
  if (threadIdx.x == 0) args.starts_before()[blockIdx.x] = starts, args.last_start_before()[blockIdx.x] = last;
}

// One CTA: pass 1's per-chunk values become exclusive prefixes in place, then the rows' first slots follow from
// the run counts (starts_before at row boundaries).
__global__ void __launch_bounds__(kScanThreads) scan_chunks(const SegmentLayoutArgs args) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const Chunks chunks = args.chunks();
  int32_t* starts = args.starts_before();
  int32_t* last = args.last_start_before();
  int starts_carry = 0, last_carry = -1;
  for (int64_t base = 0; base < chunks.count(); base += kScanThreads) {
    const int64_t c = base + threadIdx.x;
    const bool in = c < chunks.count();
    int n = in ? starts[c] : 0, l = in ? last[c] : -1, sum, max;
    Scan(tmp).ExclusiveSum(n, n, sum);
    __syncthreads();
    Scan(tmp).ExclusiveScan(l, l, last_carry, Max(), max);
    __syncthreads();
    if (in) starts[c] = starts_carry + n, last[c] = l;
    starts_carry += sum, last_carry = Max()(last_carry, max);
  }
  if (threadIdx.x == 0) starts[chunks.count()] = starts_carry;
  __syncthreads();  // the prefixes above are read across threads below

  int32_t* first_slot = args.row_first_slot();
  const int per_row = chunks.per_row();
  int slot_carry = 0;
  for (int base = 0; base < args.rows; base += kScanThreads) {
    const int r = base + threadIdx.x;
    int kept = 0, sum;
    if (r < args.rows) {
      kept = min(starts[int64_t(r + 1) * per_row] - starts[int64_t(r) * per_row], args.max_segments);
    }
    Scan(tmp).ExclusiveSum(kept, kept, sum);
    __syncthreads();
    if (r < args.rows) first_slot[r] = slot_carry + kept;
    slot_carry += sum;
  }
  if (threadIdx.x == 0) first_slot[args.rows] = slot_carry;  // the real slots of all rows
}

__global__ void __launch_bounds__(kThreads) write_layout(const SegmentLayoutArgs args) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t chunk = blockIdx.x;
  const int per_row = args.chunks().per_row(), m = args.max_segments;
  const int r = int(chunk / per_row), j = int(chunk % per_row);
  const int32_t* starts_before = args.starts_before();
  const int32_t row_first_chunk_starts = starts_before[int64_t(r) * per_row];
  const int row_runs = starts_before[int64_t(r + 1) * per_row] - row_first_chunk_starts;
  const int32_t first_slot = args.row_first_slot()[r];

  const ThreadIds mine(args, chunk);  // flat positions fit in int: the handler checks rows * seqlen < 2^31
  int run, run_start;  // runs of the row started before this thread's ids; the last run start before them
  Scan(tmp).ExclusiveSum(mine.starts, run);
  __syncthreads();
  Scan(tmp).ExclusiveScan(mine.last_start, run_start, args.last_start_before()[chunk], Max());
  run += starts_before[chunk] - row_first_chunk_starts;
  for (int i = 0; i < kIdsPerThread; ++i) {
    const int t = mine.row_start + mine.first + i;
    if (mine.start_mask >> i & 1u) {
      run_start = t;
      if (run++ < m) args.cu_seqlens[first_slot + run - 1] = run_start;
    }
    if (run - 1 < m && mine.ends_run(i)) args.seqused[first_slot + run - 1] = t + 1 - run_start;
  }

  // The row's empty slots, after all real ones (the rows before it left r * m - first_slot of them), shared out
  // among the row's chunks.
  const int64_t empty = int64_t(args.row_first_slot()[args.rows]) + int64_t(r) * m - first_slot;
  const int32_t total = args.rows * args.seqlen;
  for (int e = j * kThreads + int(threadIdx.x); e < m - min(row_runs, m); e += per_row * kThreads) {
    args.cu_seqlens[empty + e] = total, args.seqused[empty + e] = 0;
  }
  if (chunk == args.chunks().count() - 1 && threadIdx.x == 0) args.cu_seqlens[int64_t(args.rows) * m] = total;
}

// Returns the first launch error. rows, seqlen >= 1 (the handler checks).
inline cudaError_t run_segment_layout(const SegmentLayoutArgs& args, cudaStream_t stream) {
  const unsigned grid = unsigned(args.chunks().count());
  count_chunks<<<grid, kThreads, 0, stream>>>(args);
  scan_chunks<<<1, kScanThreads, 0, stream>>>(args);
  write_layout<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fa3::segments

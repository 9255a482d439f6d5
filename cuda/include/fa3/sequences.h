// Where sequence b starts and how long it is: the one question every kernel asks of its inputs
// (docs/kernels.md §10). Host and device, plain data.
//
// A side (queries or keys) of a problem is one of
//   BSHD:   a (batch, rows, heads, dim) tensor; sequence b is batch entry b, starting at row 0;
//   packed: a (rows, heads, dim) tensor holding the sequences back to back; sequence b starts at row cu[b]
//           (cu = cu_seqlens, batch + 1 int32 on the device) and owns cu[b + 1] - cu[b] rows;
// and in both forms `used` (batch int32 on the device, optional) says how many of a sequence's rows take part.
// Lengths are clamped to [0, len] (len: the side's seqlen, or the bound max_seqlen when packed) and to the rows
// that exist, so no value in cu / used can make a kernel touch memory outside its tensors; ill-formed values
// (cu decreasing, used beyond the allotment) give unspecified results, never out-of-bounds accesses.
// Rows that belong to no sequence are written by no tile: the launchers clear them first (uncovered_rows.cuh).
#pragma once

#include <cstdint>

#include "fa3/visibility.h"

namespace fa3 {

struct SeqSide {
  const int* cu = nullptr;    // packed: cumulative row offsets (batch + 1); nullptr: BSHD
  const int* used = nullptr;  // rows taking part per sequence (batch), or nullptr: all of them
  int len = 0;                // BSHD: the tensor's seqlen; packed: max_seqlen, the bound of every length
  int rows = 0;               // BSHD: rows per batch entry (= len); packed: the tensor's rows (total)

  // A BSHD side whose sequences all have the tensor's seqlen.
  static SeqSide bshd(int seqlen) { return SeqSide{nullptr, nullptr, seqlen, seqlen}; }

  FA3_HOST_DEVICE bool packed() const { return cu != nullptr; }
  // Every sequence is the whole tensor's seqlen: nothing to read on the device, no uncovered rows.
  FA3_HOST_DEVICE bool uniform() const { return cu == nullptr && used == nullptr; }
  // The tensor coordinate of sequence b's batch entry: packed tensors have one.
  FA3_HOST_DEVICE int batch_coord(int b) const { return packed() ? 0 : b; }

  // Sequence b's first row and row count (device; on the host only for uniform sides).
  FA3_HOST_DEVICE void extent(int b, int& offset, int& length) const {
    offset = 0;
    int n = len;
    if (cu != nullptr) {
      offset = imin(imax(cu[b], 0), rows);
      n = cu[b + 1] - cu[b];
    }
    if (used != nullptr) n = used[b];
    length = imax(0, imin(n, imin(len, rows - offset)));
  }

  // Packed side (device): the last of the `batch` sequences that starts at or before `row` (0 if none does),
  // by binary search over the offsets, which are nondecreasing in well-formed layouts.
  FA3_HOST_DEVICE int last_starting_at(int row, int batch) const {
    int lo = 0, hi = batch - 1, offset, length;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      extent(mid, offset, length);
      if (offset <= row) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

#ifdef __CUDACC__
  // last_starting_at answered by a whole warp (every lane calls it with the same arguments and gets the answer):
  // a 32-way search (each lane probes one offset, a vote picks the last that starts at or before the row), whose
  // log32(batch) dependent loads cost a few hundred nanoseconds each where the binary search takes log2(batch) of
  // them (segment ids make batch = rows * max_segments, 16k slots for one 16k-token row: 3 loads instead of 14).
  __device__ __forceinline__ int last_starting_at_warp(int row, int batch) const {
    const int lane = int(threadIdx.x % 32);
    int lo = 0, end = batch;  // the answer lies in [lo, end)
    while (end - lo > 1) {
      const int step = (end - lo + 31) / 32, probe = lo + lane * step;
      int offset = 0, length;
      if (probe < end) extent(probe, offset, length);
      const unsigned at_or_before = __ballot_sync(0xffffffffu, probe < end && offset <= row);
      // Lane 0 probes lo, which every round but the first already knows to start at or before row; in the first,
      // when no sequence does, the answer is 0.
      lo += at_or_before == 0 ? 0 : (31 - __clz(at_or_before)) * step;
      end = imin(end, lo + step);
    }
    return lo;
  }
#endif
};

// The tiles of kBlock rows whose first row lies in row block `block` (rows [block * kBlock, (block + 1) * kBlock))
// of a packed side, walked from a cursor `seq` (device; docs/kernels.md §10.2). Each tile of each sequence starts in
// exactly one block and a sequence has at most one tile starting in a given block, so a grid of rows / kBlock CTAs,
// each taking the tiles of its block, runs every tile once, whatever the number of sequences or their bound: usually
// one or two tiles per CTA, more only where sequences are shorter than kBlock. Offsets are taken as nondecreasing
// (the walk stops at the first sequence starting past the block); ill-formed ones may leave tiles out, never leave
// the tensor. The cursor is one int, so that a kernel looping over its tiles keeps almost nothing live across them.
template <int kBlock>
struct TilesStartingIn {
  // The cursor's start: the last sequence starting at or before the block.
  static FA3_HOST_DEVICE int first(SeqSide const& side, int batch, int block) {
    return side.last_starting_at(block * kBlock, batch);
  }

  // The next tile from cursor seq: sequence b's tile `tile` (its rows tile * kBlock..), with the sequence's extent;
  // false when the block has no more.
  static FA3_HOST_DEVICE bool next(SeqSide const& side, int batch, int block, int& seq, int& b, int& tile,
                                   int& offset, int& length) {
    const int first_row = block * kBlock, end_row = imin(first_row + kBlock, side.rows);
    for (; seq < batch; ++seq) {
      side.extent(seq, offset, length);
      if (offset >= end_row) break;
      tile = offset >= first_row ? 0 : (first_row - offset + kBlock - 1) / kBlock;
      if (int64_t(tile) * kBlock < length && int64_t(offset) + int64_t(tile) * kBlock < end_row) {
        b = seq++;
        return true;
      }
    }
    seq = batch;
    return false;
  }
};

// One sequence of a problem: its rows in the q and k tensors and its visibility rule.
struct Sequence {
  int q_offset, k_offset;  // first row in the q / k tensors (0 for BSHD sides)
  int q_batch, k_batch;    // batch coordinate in the q / k tensors (0 for packed sides)
  Visibility vis;          // lengths (seqlen_q / seqlen_k) and mask of this sequence
};

struct Sequences {
  SeqSide q, k;
  int64_t window_left, window_right;
  Visibility uniform_vis;  // every sequence's rule when uniform() (built by make on the host)

  static Sequences make(SeqSide q, SeqSide k, int64_t window_left, int64_t window_right) {
    return Sequences{q, k, window_left, window_right, Visibility::make(window_left, window_right, q.len, k.len)};
  }

  FA3_HOST_DEVICE bool uniform() const { return q.uniform() && k.uniform(); }

  // Sequence b. The kernels are compiled twice (kVarlen = !uniform(), chosen on the host): a uniform problem (every
  // dense call) reads and computes nothing per tile, its rule stays in parameter space as before sequences existed
  // (a runtime branch between the two forms measured 1-4 % slower at 512-2k tokens, docs/kernels.md §10.1).
  template <bool kVarlen>
  FA3_HOST_DEVICE Sequence at(int b) const {
    if constexpr (!kVarlen) return Sequence{0, 0, b, b, uniform_vis};
    Sequence s;
    int len_q, len_k;
    q.extent(b, s.q_offset, len_q);
    k.extent(b, s.k_offset, len_k);
    s.q_batch = q.batch_coord(b);
    s.k_batch = k.batch_coord(b);
    s.vis = Visibility::make(window_left, window_right, len_q, len_k);
    return s;
  }

  // The host's stand-in for launch decisions (tile size, schedule): the rule at the longest lengths, which is
  // every sequence's when the problem is uniform.
  Visibility bound() const { return uniform_vis; }
};

}  // namespace fa3

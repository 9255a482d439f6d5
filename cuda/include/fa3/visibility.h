// The visibility rule: which keys a query row may attend, and what follows from it for blocks of rows and keys.
// The one definition for both directions and for the host (launch decisions); docs/kernels.md §4 explains it.
//
// In a sequence of s_q queries and s_k keys, query row i sees key j iff
//     j < s_k   and   diff_lo <= j - i <= diff_hi,
// diff_lo = (s_k - s_q) - window_left, diff_hi = (s_k - s_q) + window_right: bottom-right aligned windows, causal
// being window_right = 0. Python resolves "unbounded" to bounds that exclude nothing, so no sentinels arrive here.
//
// Blocks: rows come in M-blocks of kBlockM, keys in N-blocks of kBlockN. The forward walks, per M-block, the key
// blocks of key_blocks() from the top down; the backward, per key block, the M-blocks of query_blocks(). Both ranges
// and the deterministic backward's first_key_block() derive from the same diff interval, so "key block n visits
// M-block m" and "M-block m waits for key block n" always agree (a disagreement would deadlock that mode).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA3_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FA3_HOST_DEVICE inline
#endif

namespace fa3 {

FA3_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
FA3_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }
FA3_HOST_DEVICE int ceil_div_signed(int a, int b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Key blocks [n_min, n_max) an M-block visits; those in [n_unmasked_min, n_unmasked_max) are visible to every valid
// row of the M-block in full and skip the element mask.
struct BlockRange {
  int n_min, n_max;
  int n_unmasked_min, n_unmasked_max;
};

// M-blocks [lo, hi] (inclusive; empty if lo > hi) a key block visits.
struct Range {
  int lo, hi;
};

struct Visibility {
  int seqlen_q, seqlen_k;
  int diff_lo, diff_hi;  // bounds of j - i, clamped to [-s_q, s_k]

  // Windows may be any int64. Clamping the diffs to [-s_q, s_k] changes no visible set (j - i of valid pairs lies in
  // [1 - s_q, s_k - 1]) and keeps every sum below within int32 for s_q, s_k <= 2^29 (the handlers' limit).
  // Host and device: the kernels build it per sequence (fa3/sequences.h).
  FA3_HOST_DEVICE static Visibility make(int64_t window_left, int64_t window_right, int seqlen_q, int seqlen_k) {
    const int64_t off = int64_t(seqlen_k) - seqlen_q;
    return Visibility{seqlen_q, seqlen_k, clamp_diff(off - window_left, seqlen_q, seqlen_k),
                      clamp_diff(off + window_right, seqlen_q, seqlen_k)};
  }
  FA3_HOST_DEVICE static int clamp_diff(int64_t x, int seqlen_q, int seqlen_k) {
    return int(x < -seqlen_q ? -seqlen_q : x > seqlen_k ? seqlen_k : x);
  }

  // Nothing is masked but the seqlen_k tail.
  FA3_HOST_DEVICE bool unbounded() const { return diff_lo <= 1 - seqlen_q && diff_hi >= seqlen_k - 1; }

  // Keys row i sees: [first_key(i), last_key(i)]. first_key is not clipped at 0 (it only bounds comparisons).
  FA3_HOST_DEVICE int first_key(int i) const { return i + diff_lo; }
  FA3_HOST_DEVICE int last_key(int i) const { return imin(i + diff_hi, seqlen_k - 1); }
  // Queries that see key j: [first_query(j), last_query(j)], empty past seqlen_k; not clipped to [0, s_q).
  FA3_HOST_DEVICE int first_query(int j) const { return j - diff_hi; }
  FA3_HOST_DEVICE int last_query(int j) const { return j < seqlen_k ? j - diff_lo : j - diff_hi - 1; }

  // Forward: the key blocks M-block m_block (rows up to min(.., s_q) - 1) visits.
  FA3_HOST_DEVICE BlockRange key_blocks(int m_block, int kBlockM, int kBlockN) const {
    const int row_lo = m_block * kBlockM;
    const int row_hi = imin((m_block + 1) * kBlockM, seqlen_q) - 1;
    const int n_blocks = (seqlen_k + kBlockN - 1) / kBlockN;
    const int col_hi = last_key(row_hi);
    const int col_lo = imax(first_key(row_lo), 0);
    BlockRange r;
    r.n_max = col_hi < 0 ? 0 : imin(n_blocks, col_hi / kBlockN + 1);
    r.n_min = col_lo > seqlen_k - 1 ? n_blocks : col_lo / kBlockN;
    // Block n is mask-free iff (n + 1) * kBlockN - 1 <= last_key(row_lo) and n * kBlockN >= first_key(row_hi).
    const int right_lim = last_key(row_lo) + 1;
    r.n_unmasked_max = right_lim <= 0 ? 0 : right_lim / kBlockN;
    r.n_unmasked_min = imax(0, ceil_div_signed(first_key(row_hi), kBlockN));
    return r;
  }

  // Backward: the M-blocks key block n visits.
  FA3_HOST_DEVICE Range query_blocks(int n, int kBlockM, int kBlockN) const {
    Range r{0, -1};
    if (diff_lo > diff_hi) return r;
    const int i_lo = imax(0, first_query(n * kBlockN));
    const int i_hi = imin(seqlen_q - 1, imin((n + 1) * kBlockN, seqlen_k) - 1 - diff_lo);
    if (i_lo > i_hi) return r;
    return Range{i_lo / kBlockM, i_hi / kBlockM};
  }

  // Backward, deterministic order: the first key block that contributes to M-block m (if any does).
  FA3_HOST_DEVICE int first_key_block(int m, int kBlockM, int kBlockN) const {
    return imax(0, first_key(m * kBlockM)) / kBlockN;
  }

  // Backward: whether tile (m, n), unclipped, holds a pair that is not visible or a key past seqlen_k. Rows past
  // seqlen_q need no mask there (their lse is +inf).
  FA3_HOST_DEVICE bool tile_needs_mask(int m, int n, int kBlockM, int kBlockN) const {
    const int min_diff = n * kBlockN - ((m + 1) * kBlockM - 1);
    const int max_diff = (n + 1) * kBlockN - 1 - m * kBlockM;
    return (n + 1) * kBlockN > seqlen_k || min_diff < diff_lo || max_diff > diff_hi;
  }
};

}  // namespace fa3

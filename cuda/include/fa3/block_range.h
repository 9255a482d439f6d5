// Which KV blocks an M-block touches, and which of them need the mask (KERNELS.md §6.1). Host and device; reused by
// the backward kernel (with the roles of the two sequences as it needs them).
//
// Mask semantics (bottom-right aligned; the Python side resolved "unbounded" already):
//   row i sees key j  iff  j < s_k  and  i + off - wl <= j <= i + off + wr,   off = s_k - s_q.
// Blocks are iterated from n_max - 1 down to n_min. Blocks in [n_unmasked_min, n_unmasked_max) are fully visible to
// every valid row of the M-block and run the mask-free body; the others (the diagonal / seqlen tail at the top, the
// left window edge at the bottom) run the masked body.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA3_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FA3_HOST_DEVICE inline
#endif

namespace fa3 {

// Clamp a window to a range that changes no visible set and keeps every sum below within int32.
struct MaskWindow {
  int left;   // wl clamped to [-(s_q + s_k), s_k]
  int right;  // wr clamped to [-(s_q + s_k), s_q]

  static MaskWindow make(int64_t window_left, int64_t window_right, int seqlen_q, int seqlen_k) {
    const int64_t lo = -(int64_t(seqlen_q) + seqlen_k);
    int64_t l = window_left < lo ? lo : (window_left > seqlen_k ? int64_t(seqlen_k) : window_left);
    int64_t r = window_right < lo ? lo : (window_right > seqlen_q ? int64_t(seqlen_q) : window_right);
    return MaskWindow{int(l), int(r)};
  }
  // Nothing masked except the seqlen_k tail: the caller may take the window-free path.
  FA3_HOST_DEVICE bool unbounded(int seqlen_q, int seqlen_k) const {
    return left >= seqlen_k - 1 && right >= seqlen_q - 1;
  }
};

FA3_HOST_DEVICE int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
FA3_HOST_DEVICE int ceil_div_signed(int a, int b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }
FA3_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
FA3_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }

struct BlockRange {
  int n_min, n_max;                    // visited blocks: [n_min, n_max); empty if n_min >= n_max
  int n_unmasked_min, n_unmasked_max;  // mask-free blocks (may be empty)
};

// Row range [m_block * kBlockM, min((m_block + 1) * kBlockM, s_q)) against key blocks of kBlockN.
FA3_HOST_DEVICE BlockRange fwd_block_range(int m_block, int kBlockM, int kBlockN, int seqlen_q, int seqlen_k,
                                           MaskWindow w) {
  const int off = seqlen_k - seqlen_q;
  const int row_lo = m_block * kBlockM;
  const int row_hi = imin((m_block + 1) * kBlockM, seqlen_q) - 1;  // last valid row (row_lo <= row_hi)
  const int n_blocks = (seqlen_k + kBlockN - 1) / kBlockN;
  BlockRange r;
  // Largest visible column of any row is row_hi + off + wr; smallest is row_lo + off - wl.
  const int col_hi = imin(row_hi + off + w.right, seqlen_k - 1);
  const int col_lo = imax(row_lo + off - w.left, 0);
  r.n_max = col_hi < 0 ? 0 : imin(n_blocks, col_hi / kBlockN + 1);
  r.n_min = col_lo > seqlen_k - 1 ? n_blocks : col_lo / kBlockN;
  // Block n is mask-free iff (n+1)*BN <= min(s_k, row_lo + off + wr + 1) and n*BN >= row_hi + off - wl.
  const int right_lim = imin(seqlen_k, row_lo + off + w.right + 1);
  r.n_unmasked_max = right_lim <= 0 ? 0 : right_lim / kBlockN;
  r.n_unmasked_min = imax(0, ceil_div_signed(row_hi + off - w.left, kBlockN));
  return r;
}

}  // namespace fa3

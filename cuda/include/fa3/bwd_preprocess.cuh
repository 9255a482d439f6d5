// Backward preprocess (docs/kernels.md §3.2): D = rowsum(dO * O) - dlse in fp32 and lse * log2(e), both per
// (sequence, head, row) with rows padded to whole M-blocks (BwdRows, bwd_launch.h), and the row's slice of the fp32
// dQ accumulator set to zero. lse = -inf (row sees no key) becomes 0 so that masked scores give exp2(-inf - 0) = 0
// rather than NaN; padding rows get lse = +inf and D = 0, so P = 0 there without a row mask. dlse, the cotangent of
// lse (optional, nullptr when lse was not differentiated), enters only here: d lse / d S = P, so it shifts every
// dS = P * (dP - D) of its row by P * dlse, which is D - dlse in place of D. (The deterministic mode's semaphores are
// zeroed by cudaMemsetAsync.)
#pragma once

#include <cmath>

#include "cutlass/numeric_types.h"

#include "fa3/bwd_launch.h"
#include "fa3/params.h"
#include "fa3/sequences.h"

namespace fa3 {
namespace bwd {

// 8 lanes per (b, h, padded row), 32 rows per 256-thread block. Each lane keeps several 16-byte loads of dO and O in
// flight (d_v / 64 of each), so the read stream runs near HBM bandwidth (one warp per row with 16-byte lanes left half
// the warp idle at d_v = 128 and ran at about half of it: NOTES_bwd.md v7). Row r of the accumulator is the contiguous
// d floats at r * d: M-block tiles are stored in the padded-row order (bwd_launch.h), whatever the order inside one.
constexpr int kPreprocessLanesPerRow = 8;
constexpr int kPreprocessRowsPerBlock = 256 / kPreprocessLanesPerRow;

template <class Element>
struct BwdPreprocessArgs {
  const Element* dout;
  const Element* out;
  Strides dout_strides, out_strides;
  const float* lse;
  const float* dlse;  // nullptr: lse not differentiated
  Strides lse_strides;
  float* lse_log2;  // workspace sections (bwd_launch.h)
  float* dsum;
  float* dq_accum;
  BwdRows ws_rows;
  SeqSide seq_q;
  int batch, heads;
  int seq_rows;  // BSHD queries: rows visited per (batch entry, head), the seqlen's M-blocks
};

// Blocks of the grid: BSHD queries, one group of 32 rows of one (batch entry, head) per block; packed queries,
// PackedRowBlocks.
inline long long bwd_preprocess_blocks(SeqSide const& seq_q, int batch, int heads, int seq_rows) {
  if (seq_q.packed()) return PackedRowBlocks::count(seq_q.rows, heads);
  return ((long long)batch * heads * seq_rows + kPreprocessRowsPerBlock - 1) / kPreprocessRowsPerBlock;
}

// Row i of sequence b (first tensor row `offset`, `seqlen` rows), head h, by the kLanes lanes of its group (sub: the
// lane's index). Rows in [seqlen, the M-blocks' end) are padding.
template <class Element, int kHeadDim, int kHeadDimV>
__device__ __forceinline__ void preprocess_row(BwdPreprocessArgs<Element> const& args, int b, int h, int offset,
                                               int seqlen, int i, int sub) {
  constexpr int kLanes = kPreprocessLanesPerRow;
  const int64_t ws_row = args.ws_rows.first_row(b, h, offset) + i;

  float4* dq_row = reinterpret_cast<float4*>(args.dq_accum + ws_row * kHeadDim);
#pragma unroll
  for (int c = sub; c < kHeadDim / 4; c += kLanes) dq_row[c] = make_float4(0.f, 0.f, 0.f, 0.f);

  const int bc = args.seq_q.batch_coord(b);
  const int64_t row = int64_t(offset) + i;  // in the tensors
  float acc = 0.f;
  if (i < seqlen) {
    const Element* dout = args.dout + bc * args.dout_strides.batch + row * args.dout_strides.row +
                          h * args.dout_strides.head;
    const Element* out = args.out + bc * args.out_strides.batch + row * args.out_strides.row +
                         h * args.out_strides.head;
    constexpr int kChunks = kHeadDimV / 8;  // 16-byte chunks per row
    constexpr int kPerLane = (kChunks + kLanes - 1) / kLanes;
    uint4 a[kPerLane], o[kPerLane];  // all loads first, then the arithmetic
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const bool in = k * kLanes + sub < kChunks;
      a[k] = in ? *reinterpret_cast<const uint4*>(dout + (k * kLanes + sub) * 8) : uint4{0, 0, 0, 0};
      o[k] = in ? *reinterpret_cast<const uint4*>(out + (k * kLanes + sub) * 8) : uint4{0, 0, 0, 0};
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
    if (i < seqlen) {
      const int64_t stat = bc * args.lse_strides.batch + h * args.lse_strides.head + row;
      const float x = args.lse[stat];
      l = x == -INFINITY ? 0.f : x * 1.4426950408889634f;
      if (args.dlse != nullptr) acc -= args.dlse[stat];
    }
    args.dsum[ws_row] = acc;
    args.lse_log2[ws_row] = l;
  }
}

// BSHD queries: thread group r covers row i of (batch entry b, head h), r = (b * heads + h) * seq_rows + i; rows past
// the sequence's last M-block have no workspace rows (whole warps leave together: seq_rows and the M-blocks are
// multiples of the 4 rows of a warp). Packed queries: every group of the block takes rows of each M-block starting
// in the block's rows, 32 at a time.
template <class Element, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(256) bwd_preprocess_kernel(const BwdPreprocessArgs<Element> args) {
  constexpr int kBlockM = BwdRows::kBlockM;
  const int group = threadIdx.x / kPreprocessLanesPerRow, sub = threadIdx.x % kPreprocessLanesPerRow;
  if (args.seq_q.packed()) {
    int block, h;
    PackedRowBlocks::of_cta(args.heads, block, h);
    int seq = TilesStartingIn<kBlockM>::first(args.seq_q, args.batch, block);
    int b, m_block, offset, seqlen;
    while (TilesStartingIn<kBlockM>::next(args.seq_q, args.batch, block, seq, b, m_block, offset, seqlen)) {
      for (int i = m_block * kBlockM + group; i < (m_block + 1) * kBlockM; i += kPreprocessRowsPerBlock) {
        preprocess_row<Element, kHeadDim, kHeadDimV>(args, b, h, offset, seqlen, i, sub);
      }
    }
    return;
  }
  const long long r = (long long)blockIdx.x * kPreprocessRowsPerBlock + group;
  if (r >= (long long)args.batch * args.heads * args.seq_rows) return;
  const int i = int(r % args.seq_rows);
  const long long bh = r / args.seq_rows;
  const int h = int(bh % args.heads);
  const int b = int(bh / args.heads);
  int offset, seqlen;
  args.seq_q.extent(b, offset, seqlen);
  if (i >= (seqlen + kBlockM - 1) / kBlockM * kBlockM) return;
  preprocess_row<Element, kHeadDim, kHeadDimV>(args, b, h, offset, seqlen, i, sub);
}

}  // namespace bwd
}  // namespace fa3

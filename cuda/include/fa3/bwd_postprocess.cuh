// Backward postprocess (docs/kernels.md §3.10): dQ = softmax_scale * dQ_accum, converted to the element type.
// The accumulator holds each kBlockM x d tile in the dQ GEMM's fragment order (see bwd_dq.cuh), so this kernel
// partitions an identity tensor with the same tiled MMA to find each value's (row, column).
#pragma once

#include "cute/tensor.hpp"

#include "fa3/bwd_dq.cuh"
#include "fa3/bwd_launch.h"
#include "fa3/params.h"
#include "fa3/sequences.h"

namespace fa3 {
namespace bwd {

// 1-D grid (bwd_postprocess_blocks) of 256-thread CTAs (one thread per consumer thread of the main kernel), so no
// grid dimension limits batch or heads: BSHD queries, one CTA per (b, h, m_block) with m_block fastest (M-blocks past a
// sequence's end leave at once); packed queries, one per (64-row block of the tensor, head), taking the M-blocks that
// start in it (TilesStartingIn), so that the grid follows the rows, not the number of sequences times their bound.
// The converted tile is transposed to row-major through SMEM and written as whole 16-byte row chunks: stored
// straight from the fragment positions, each warp store covered 16 of every 32 bytes of its sectors, and the kernel
// ran at ~60 % of HBM bandwidth (NOTES_bwd.md v7). The row pitch is padded by 16 bytes, which spreads the fragment
// rows over all banks.
template <class Traits>
struct BwdPostprocessArgs {
  const float* dq_accum;
  typename Traits::Element* dq;
  Strides dq_strides;
  BwdRows ws_rows;
  SeqSide seq_q;
  int batch, heads, num_m;  // num_m: BSHD queries, the seqlen's M-blocks
  float scale;
};

inline long long bwd_postprocess_blocks(SeqSide const& seq_q, int batch, int heads, int num_m) {
  if (seq_q.packed()) return PackedRowBlocks::count(seq_q.rows, heads);
  return (long long)batch * heads * num_m;
}

// M-block m_block of sequence b (first tensor row `offset`, `seqlen` rows), head h.
template <class Traits>
__device__ __forceinline__ void postprocess_tile(BwdPostprocessArgs<Traits> const& args, typename Traits::Element* tile,
                                                 int b, int h, int m_block, int offset, int seqlen) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kHeadDim = Traits::kHeadDim;
  constexpr int kPitch = kHeadDim + 8;  // elements
  const int tid = threadIdx.x;
  typename Traits::TiledMmadQ mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor coords = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  static_assert(decltype(size(coords))::value == Traits::kdQPerThread);
  const float* src = args.dq_accum + (args.ws_rows.first_row(b, h, offset) + m_block * kBlockM) * kHeadDim;
  CUTE_UNROLL
  for (int g = 0; g < Traits::kdQPerThread / 4; ++g) {
    const float4 v = *reinterpret_cast<const float4*>(src + dq_granule_offset<Traits::kdQPerThread / 4>(g, tid));
    const float vals[4] = {v.x, v.y, v.z, v.w};
    CUTE_UNROLL
    for (int e = 0; e < 4; e += 2) {  // fragment values e, e + 1 are adjacent columns of one row
      Element pair[2] = {Element(vals[e] * args.scale), Element(vals[e + 1] * args.scale)};
      *reinterpret_cast<uint32_t*>(&tile[get<0>(coords(g * 4 + e)) * kPitch + get<1>(coords(g * 4 + e))]) =
          *reinterpret_cast<uint32_t*>(pair);
    }
  }
  __syncthreads();
  constexpr int kChunksPerRow = kHeadDim / 8;
  const Strides& st = args.dq_strides;
  Element* dst = args.dq + args.seq_q.batch_coord(b) * st.batch + int64_t(offset) * st.row + h * st.head;
  for (int idx = tid; idx < kBlockM * kChunksPerRow; idx += 256) {
    const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
    const int row = m_block * kBlockM + r;
    if (row < seqlen) {
      *reinterpret_cast<uint4*>(dst + row * st.row + c) = *reinterpret_cast<const uint4*>(&tile[r * kPitch + c]);
    }
  }
  __syncthreads();  // the SMEM tile is free for the CTA's next M-block
}

template <class Traits>
__global__ void __launch_bounds__(256) bwd_postprocess_kernel(const BwdPostprocessArgs<Traits> args) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  __shared__ alignas(16) Element tile[kBlockM * (Traits::kHeadDim + 8)];
  int b, m_block, offset, seqlen;
  if (args.seq_q.packed()) {
    int block, h;
    PackedRowBlocks::of_cta(args.heads, block, h);
    int seq = TilesStartingIn<kBlockM>::first(args.seq_q, args.batch, block);
    while (TilesStartingIn<kBlockM>::next(args.seq_q, args.batch, block, seq, b, m_block, offset, seqlen)) {
      postprocess_tile(args, tile, b, h, m_block, offset, seqlen);
    }
    return;
  }
  m_block = int(blockIdx.x % unsigned(args.num_m));
  const int h = int(blockIdx.x / unsigned(args.num_m) % unsigned(args.heads));
  b = int(blockIdx.x / unsigned(args.num_m) / unsigned(args.heads));
  args.seq_q.extent(b, offset, seqlen);
  if (m_block * kBlockM >= seqlen) return;  // past the sequence: no workspace tile
  postprocess_tile(args, tile, b, h, m_block, offset, seqlen);
}

}  // namespace bwd
}  // namespace fa3

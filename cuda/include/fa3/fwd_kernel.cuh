// The forward kernel shell: roles, register reallocation, barrier setup, the loop over this CTA's tiles
// (docs/kernels.md §2.1, §2.9).
//
// Warpgroup 0 is the producer (one elected thread issues all TMA; with sequences of their own lengths the other
// three producer warps clear the query rows no sequence covers, uncovered_rows.cuh, and otherwise exit after giving
// their registers back); warpgroups 1.. are consumers of 64 rows each. Both sides see the same tile sequence
// (FwdTileScheduler: the same static walk, or the dynamic walk's tiles that the producer publishes) and skip the same
// empty tiles (past the sequence's rows, or no visible KV block), so the pipeline stages and the Q phase advance in
// step. With the persistent grid the producer runs up to a tile
// ahead: it loads the next tile's first K block and, once every consumer warp is past its last Q K^T
// (bar_q_empty), the next Q, while the consumers finish the last P V and the epilogue.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"

#include "fa3/epilogue_fwd.cuh"
#include "fa3/fwd_traits.cuh"
#include "fa3/mainloop_fwd.cuh"
#include "fa3/sequences.h"
#include "fa3/split_kv.h"
#include "fa3/tile_scheduler.cuh"

namespace fa3 {

// kVarlen: sequences of their own lengths and offsets (fa3/sequences.h), else every sequence is the tensors' seqlen.
template <class Traits, bool kVarlen>
__global__ void __launch_bounds__(Traits::kNumThreads, 1) fwd_kernel(CUTE_GRID_CONSTANT FwdArgs<Traits> const args) {
  using namespace cute;
  using Storage = typename Traits::SharedStorage;
  using Mainloop = FwdMainloop<Traits>;
  using Epilogue = FwdEpilogue<Traits>;

  extern __shared__ __align__(1024) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);

  const int warp_group = cutlass::canonical_warp_group_idx();
  const int warp_in_group = cutlass::canonical_warp_idx_sync() % 4;

  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&smem.bar_q, 1);
    cutlass::arch::ClusterBarrier::init(&smem.bar_q_empty, Traits::kNumMmaThreads / 32);
    smem.pipe_k.init(Traits::kNumMmaThreads);
    smem.pipe_v.init(Traits::kNumMmaThreads);
    smem.tiles.init(Traits::kNumMmaThreads);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  const FwdTileScheduler& sched = args.scheduler;
  using Role = FwdTileScheduler::Role;
  // A tile past its sequence's last row (sequences shorter than the longest, fa3/sequences.h) has nothing to
  // compute or store.
  auto tile_has_rows = [&](FwdTileScheduler::Tile const& tile, Sequence const& seq) {
    return tile.m_block * Traits::kBlockM < seq.vis.seqlen_q;
  };
  // The tile's key blocks: the m-block's visible ones, or their chunk for its split (fa3/split_kv.h).
  auto tile_range = [&](FwdTileScheduler::Tile const& tile, Sequence const& seq) {
    const BlockRange visible = seq.vis.key_blocks(tile.m_block, Traits::kBlockM, Traits::kBlockN);
    if constexpr (!Traits::Tile::kSplitKV) return visible;
    return split_chunk(visible, tile.split, args.splits.count);
  };
  typename Mainloop::PipeStates pipes;
  int tiles_done = 0;  // tiles with a non-empty range that this CTA has run: the Q load count

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::Tile::kProducerRegs>();
    // One lane issues the loads. It walks the tiles alone, except on the packed walk (persistent grid, kVarlen), which
    // reads lengths a warp at a time and so takes the whole warp. (The walking lanes then need more than the
    // producer's registers, and a dense walk by the whole warp spilled too; docs/kernels.md §2.9.)
    constexpr bool kWarpWalks = Traits::kPersistent && kVarlen;
    const bool issuer = warp_in_group == 0 && cute::elect_one_sync();
    if (warp_in_group == 0 && (kWarpWalks || issuer)) {
      if (issuer) Mainloop::prefetch_descriptors(args);
      sched.for_each_tile<Traits::kPersistent, kVarlen, Traits::kBlockM, Traits::kBlockN, Role::kProducer>(
          args.seqs, smem.tiles, [&](FwdTileScheduler::Tile const& tile) {
        const Sequence seq = args.seqs.template at<kVarlen>(tile.batch);
        if (!tile_has_rows(tile, seq)) return;
        const BlockRange range = tile_range(tile, seq);
        if (range.n_min >= range.n_max) return;
        if (issuer) Mainloop::load(args, smem, tile.m_block, tile.head, seq, range, pipes, tiles_done);
        ++tiles_done;
      });
    } else if (kVarlen && warp_in_group != 0) {  // beside the tiles, which write only covered rows
      clear_uncovered_rows(args.uncovered, blockIdx.x * 3ll + warp_in_group - 1, gridDim.x * 3ll);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::Tile::kConsumerRegs>();
    const int thread_idx = threadIdx.x - 128;
    typename Traits::TiledMmaPV mma_pv;
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<typename Traits::BM, typename Traits::DV>{});
    Mainloop::pingpong_open(thread_idx);
    sched.for_each_tile<Traits::kPersistent, kVarlen, Traits::kBlockM, Traits::kBlockN, Role::kConsumer>(
        args.seqs, smem.tiles, [&](FwdTileScheduler::Tile const& tile) {
      const Sequence seq = args.seqs.template at<kVarlen>(tile.batch);
      if (!tile_has_rows(tile, seq)) return;
      const BlockRange range = tile_range(tile, seq);
      clear(tOrO);
      OnlineSoftmax<2> softmax(args.scale_log2);
      if (range.n_min < range.n_max) {  // else: no visible key, the epilogue writes O = 0 and LSE = -inf
        Mainloop::mma(args, smem, thread_idx, tile.m_block, seq.vis, range, tOrO, softmax, pipes,
                      uint32_t(tiles_done) & 1u);
        ++tiles_done;
      }
      Epilogue::store(args, smem, thread_idx, tile, seq, tOrO, softmax);
    });
    Mainloop::pingpong_close(thread_idx);
  }
}

}  // namespace fa3

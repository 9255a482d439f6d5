// The backward main kernel's shell (docs/kernels.md §3.3): roles, register reallocation, barrier setup, the loop over
// this CTA's tiles. KV-stationary: one CTA per (key block, kv head, sequence), or, where that grid would be mostly
// empty (packed keys of many short or empty sequences), per block of the key tensor's rows, running the key tiles
// that start there one after another (for_each_bwd_tile, bwd_block_order.cuh).
//
// Warpgroup 0 is the producer: thread 0 issues the loads (BwdMainloop::load); on the bulk dQ path its warp 1 is the
// dQ writer (bwd_dq.cuh). Warpgroups 1-2 consume (BwdMainloop::mma) and write dK / dV (BwdEpilogue).
// Looping over the query heads of a GQA group inside the CTA keeps dK/dV in registers: no dK/dV workspace and no
// cross-CTA reduction for GQA/MQA (deterministic by construction); the cost is fewer CTAs when h_k * b is small.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"

#include "fa3/bwd_block_order.cuh"
#include "fa3/bwd_dq.cuh"
#include "fa3/bwd_epilogue.cuh"
#include "fa3/bwd_mainloop.cuh"
#include "fa3/bwd_traits.cuh"

namespace fa3 {
namespace bwd {

// kVarlen: sequences of their own lengths and offsets (fa3/sequences.h), else every sequence is the tensors' seqlen.
template <class Traits, bool kVarlen>
__global__ void __launch_bounds__(Traits::kNumThreads, 1) bwd_kernel(const __grid_constant__ BwdArgs<Traits> args) {
  using namespace cute;
  using Mainloop = BwdMainloop<Traits>;
  using Epilogue = BwdEpilogue<Traits, kVarlen>;
  using SharedStorage = typename Traits::SharedStorage;

  extern __shared__ char smem_raw[];
  SharedStorage& ss =
      *reinterpret_cast<SharedStorage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int warp_group = threadIdx.x / 128;
  // Bulk dQ path (bwd_dq.cuh): consumers stage their dQ partials in SMEM, the writer warp adds them.
  const bool dq_bulk = Traits::kdQViaSmem && !args.deterministic;

  if (threadIdx.x == 0) {
    ss.pipe.init(Traits::kNumMmaThreads);
    cutlass::arch::ClusterTransactionBarrier::init(&ss.kv_barrier, 1);
    cutlass::arch::ClusterBarrier::init(&ss.kv_empty, 1);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  // Every role runs its part of each of the CTA's tiles, in the same order.
  auto for_each_tile = [&](auto&& f) {
    for_each_bwd_tile<Traits::kBlockM, Traits::kBlockN, kVarlen>(args, f);
  };
  typename Mainloop::Stage stage;

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if constexpr (Traits::kdQViaSmem) {
      if (dq_bulk && threadIdx.x / 32 == 1) {
        dq_writer_open();
        for_each_tile([&](BwdTile const& w) {
          dq_writer_tile<Traits::kdQPerThread * 128>(
              ss.dq.data(), Mainloop::first_query_tile(args, w), w.n_iters,
              [&](int head, int m_block) { return Mainloop::dq_tile(args, w, head, m_block); });
        });
        dq_writer_close();
        return;
      }
    }
    if (threadIdx.x != 0) return;
    int tiles_seen = 0;
    for_each_tile([&](BwdTile const& w) { Mainloop::load(args, ss, w, tiles_seen++, stage); });
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int tid = threadIdx.x - 128;
  Tensor tdVrdV = partition_fragment_C(typename Traits::TiledMmadV{}, Shape<typename Traits::BN, typename Traits::DV>{});
  Tensor tdKrdK = partition_fragment_C(typename Traits::TiledMmadK{}, Shape<typename Traits::BN, typename Traits::D>{});
  int loaded = 0;  // tiles whose K / V were loaded: kv_barrier's phase
  for_each_tile([&](BwdTile const& w) {
    clear(tdVrdV);
    clear(tdKrdK);
    if (w.n_iters > 0) {
      Mainloop::mma(args, ss, tid, w, uint32_t(loaded++) & 1u, dq_bulk, stage, tdVrdV, tdKrdK);
    }
    Epilogue::store(args, ss, tid, w, tdKrdK, tdVrdV);
  });
}

}  // namespace bwd
}  // namespace fa3

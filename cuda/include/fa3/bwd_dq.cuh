// The backward's query-tile cursor and dQ writer (docs/kernels.md §3.6, §3.7). Which M-blocks a key block visits,
// and the first key block of an M-block for the deterministic order, come from fa3/visibility.h.
//
// dQ: each CTA adds its kBlockM x d partial into an fp32 workspace tile. The tile is stored in fragment order, one
// contiguous slice per consumer warpgroup: granule g (4 floats) of thread t of warpgroup w at float offset
// ((w * granules + g) * 128 + t) * 4, so a warp's 32 granules cover 512 contiguous bytes and a warpgroup's slice is
// one contiguous range. Two ways to add it:
//  - bulk (non-deterministic, Traits::kdQViaSmem): the warpgroup stages its slice in SMEM and hands it to the dQ
//    writer, a warp of the producer warpgroup, which issues one cp.reduce.async.bulk add of the whole slice. The TMA
//    unit performs the adds and the registers are free at once (per-thread red.global.add.v4 kept ~14 % of all warp
//    samples stalled on register release at d=128, ncu); the consumers only store and signal (issuing the add
//    themselves, behind a warpgroup barrier, measured 2-8 % slower at d=128, NOTES_bwd.md v6).
//  - registers: red.global.add.v4.f32 per granule, straight from the accumulator (other head dims, deterministic).
// Deterministic mode orders the CTAs adding into one tile by a per-tile semaphore: key block n adds when the
// counter equals n - n_first(m), then increments it.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"

#include "fa3/pipeline.cuh"

namespace fa3 {
namespace bwd {

// A CTA's (query head, M-block) sequence: every query head of the GQA group, and for each the visited M-blocks in
// order. Stepped incrementally (an integer division per iteration costs ~30 instructions).
struct QueryTileCursor {
  int head, m_block, m_lo, m_hi;
  CUTE_HOST_DEVICE void next() {
    if (++m_block > m_hi) {
      m_block = m_lo;
      ++head;
    }
  }
};

CUTE_DEVICE void red_add_v4(float* gptr, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(gptr), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}

CUTE_DEVICE int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Threads of a bulk dQ hand-off barrier (BwdBarrier::kdQFull / kdQEmpty): one consumer warpgroup and the writer warp.
constexpr int kdQHandoffThreads = 128 + 32;

CUTE_DEVICE void consumer_sync() { named_barrier_sync(256, BwdBarrier::kConsumers); }

// Float offset of granule g of consumer thread tid (0..255) in a dQ tile (layout above).
template <int kGranules>
CUTE_DEVICE int dq_granule_offset(int g, int tid) {
  return (((tid >> 7) * kGranules + g) * 128 + (tid & 127)) * 4;
}

// Calls write(float offset of the granule in the tile, its 4 values) for each granule of a dQ partial fragment.
template <class Tensor, class Write>
CUTE_DEVICE void for_each_dq_granule(Tensor const& frag, int tid, Write&& write) {
  using namespace cute;
  constexpr int N = decltype(size(frag))::value;
  CUTE_UNROLL
  for (int g = 0; g < N / 4; ++g) {
    write(dq_granule_offset<N / 4>(g, tid), frag(4 * g), frag(4 * g + 1), frag(4 * g + 2), frag(4 * g + 3));
  }
}

// Adds a dQ partial fragment into its workspace tile with one vector reduction per granule.
template <class Tensor>
CUTE_DEVICE void dq_accumulate(Tensor const& frag, float* tile, int tid) {
  for_each_dq_granule(frag, tid,
                      [&](int off, float a, float b, float c, float d) { red_add_v4(tile + off, a, b, c, d); });
}

// Writes a dQ partial fragment into the SMEM copy of its tile (same layout as the workspace tile).
template <class Tensor>
CUTE_DEVICE void dq_stage(Tensor const& frag, float* smem_tile, int tid) {
  const uint32_t base = uint32_t(__cvta_generic_to_shared(smem_tile));
  for_each_dq_granule(frag, tid, [&](int off, float a, float b, float c, float d) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(base + off * 4), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
  });
}

// One bulk reduce-add of `bytes` (multiple of 16) from SMEM into global memory, as its own bulk group.
CUTE_DEVICE void bulk_reduce_add_f32(float* gdst, const float* ssrc, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(gdst),
               "r"(uint32_t(__cvta_generic_to_shared(ssrc))), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// All but this thread's newest kPending bulk groups have finished reading their SMEM source.
template <int kPending>
CUTE_DEVICE void bulk_wait_source_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// This thread's bulk groups are complete.
CUTE_DEVICE void bulk_wait_complete() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Consumer side of the bulk path: stage warpgroup w's slice once the writer has read the previous one, then hand
// it over.
template <class Tensor>
CUTE_DEVICE void dq_hand_off(Tensor const& frag, float* smem_tile, int tid) {
  const int w = tid / 128;
  named_barrier_sync(kdQHandoffThreads, BwdBarrier::kdQEmpty, w);
  dq_stage(frag, smem_tile, tid);
  cutlass::arch::fence_view_async_shared();  // generic SMEM writes -> the bulk copy's async proxy
  named_barrier_arrive(kdQHandoffThreads, BwdBarrier::kdQFull, w);
}

// The dQ writer warp, in three parts: dq_writer_open once, dq_writer_tile for each of the CTA's tiles, dq_writer_close
// once. For each of a tile's n_iters (query head, M-block) iterations, in the consumers' order, one bulk reduce-add per
// consumer warpgroup's slice (kSliceFloats floats) into the workspace tile tile_of(head, m_block). Each slice is
// released as soon as it has been read, and the warp leaves only when its adds are complete (their SMEM source must
// outlive them). Lane 0 issues.
CUTE_DEVICE void dq_writer_open() {
  for (int w = 0; w < 2; ++w) named_barrier_arrive(kdQHandoffThreads, BwdBarrier::kdQEmpty, w);
}

template <int kSliceFloats, class TileOf>
CUTE_DEVICE void dq_writer_tile(const float* smem_tile, QueryTileCursor t, int n_iters, TileOf&& tile_of) {
  const bool leader = threadIdx.x % 32 == 0;
  for (int it = 0; it < n_iters; ++it, t.next()) {
    float* tile = tile_of(t.head, t.m_block);
    for (int w = 0; w < 2; ++w) {
      named_barrier_sync(kdQHandoffThreads, BwdBarrier::kdQFull, w);
      if (leader) bulk_reduce_add_f32(tile + w * kSliceFloats, smem_tile + w * kSliceFloats, kSliceFloats * 4);
    }
    if (leader) bulk_wait_source_read<1>();
    __syncwarp();
    named_barrier_arrive(kdQHandoffThreads, BwdBarrier::kdQEmpty);
    if (leader) bulk_wait_source_read<0>();
    __syncwarp();
    named_barrier_arrive(kdQHandoffThreads, BwdBarrier::kdQEmpty, 1);
  }
}

CUTE_DEVICE void dq_writer_close() {
  if (threadIdx.x % 32 == 0) bulk_wait_complete();
}

// Deterministic mode: wait until it is this CTA's turn on the tile's counter. A spin budget turns a logic error
// into a trap (launch failure) instead of a hung GPU.
CUTE_DEVICE void dq_wait_turn(const int* sem, int turn, int tid) {
  if (tid == 0) {
    long long spins = 0;
    while (ld_acquire(sem) != turn) {
      __nanosleep(64);
      if (++spins > (1ll << 27)) __trap();
    }
  }
  consumer_sync();
}

CUTE_DEVICE void dq_pass_turn(int* sem, int tid) {
  __threadfence();  // this thread's reductions are performed before the counter moves
  consumer_sync();
  if (tid == 0) {
    __threadfence();
    atomicAdd(sem, 1);
  }
}

}  // namespace bwd
}  // namespace fa3

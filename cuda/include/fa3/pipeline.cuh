// mbarrier pipelines and named barriers used by the warp-specialised kernels (docs/kernels.md §2.2, §2.6).
//
// A stage has a "full" barrier (count 1: the producer's arrive.expect_tx; TMA completes the transaction) and an
// "empty" barrier that the consumers arrive on once their reads of the stage are done. Who arrives is the pipeline's
// ReleaseBy: lane 0 of each consumer warp after a __syncwarp (cheap: docs/kernels.md §2.2, per-thread arrivals
// regressed FA3's forward), or every consumer thread, where threads read the stage with generic loads as well as
// WGMMA (the backward's lse / D): each thread's arrival then follows its own reads, which compute-sanitizer's
// racecheck can see, and a warp's __syncwarp hand-off it cannot.
#pragma once

#include <cstdint>

#include "cutlass/arch/barrier.h"

namespace fa3 {

// Named barrier ids of each kernel, offset past the ids CUTLASS reserves (named_barrier_* add
// NamedBarrier::ReservedNamedBarrierCount); named barriers are per CTA, so the two kernels' ids may coincide.
enum class FwdBarrier : uint32_t {
  kConsumers = 0,   // all consumer threads (epilogue, when O is staged in Q's SMEM)
  kPingpong0 = 1,   // pingpong (docs/kernels.md §2.6): warpgroup w (< 3) waits on kPingpong0 + w before its GEMMs
  kEpilogue0 = 4,   // consumer warpgroup w's own epilogue barrier: kEpilogue0 + w
};
enum class BwdBarrier : uint32_t {
  kConsumers = 0,   // both consumer warpgroups (256 threads)
  kdQFull = 1,      // bulk dQ hand-off (bwd_dq.cuh) from consumer warpgroup w to the writer warp: kdQFull + w
  kdQEmpty = 3,     // and back: kdQEmpty + w, the writer has read w's previous partial
};

// One arrival per warp on an mbarrier, once every thread of the warp is done with what the barrier guards.
CUTLASS_DEVICE void warp_arrive(uint64_t* bar) {
  __syncwarp();
  if (cutlass::canonical_lane_idx() == 0) cutlass::arch::ClusterBarrier::arrive(bar);
}

template <int kStages>
struct PipeState {
  int index = 0;
  uint32_t phase = 0;
  CUTLASS_DEVICE void advance() {
    if (++index == kStages) {
      index = 0;
      phase ^= 1u;
    }
  }
};

enum class ReleaseBy { kWarp, kThread };

template <int kStages, ReleaseBy kReleaseBy = ReleaseBy::kWarp>
struct TmaPipeline {
  uint64_t full[kStages];
  uint64_t empty[kStages];

  // consumer_threads: the threads that consume (and release) every stage.
  CUTLASS_DEVICE void init(int consumer_threads) {
    const int arrivals = kReleaseBy == ReleaseBy::kWarp ? consumer_threads / 32 : consumer_threads;
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], arrivals);
    }
  }
  // Producer: wait until the consumers released the stage (the first pass over the stages succeeds at once: the
  // producer starts on the opposite parity), then announce the bytes TMA will deliver.
  CUTLASS_DEVICE void producer_acquire(PipeState<kStages> const& st, uint32_t tx_bytes) {
    cutlass::arch::ClusterBarrier::wait(&empty[st.index], st.phase ^ 1u);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full[st.index], tx_bytes);
  }
  CUTLASS_DEVICE void consumer_wait(PipeState<kStages> const& st) {
    cutlass::arch::ClusterBarrier::wait(&full[st.index], st.phase);
  }
  // Called by every consumer thread once its reads of the stage are done (its WGMMAs reading it waited on).
  CUTLASS_DEVICE void consumer_release(PipeState<kStages> const& st) {
    if constexpr (kReleaseBy == ReleaseBy::kWarp) warp_arrive(&empty[st.index]);
    else cutlass::arch::ClusterBarrier::arrive(&empty[st.index]);
  }
};

// bar.sync / bar.arrive on barrier `id + sub` of either kernel. The memory clobber keeps the compiler from moving
// SMEM accesses across the barrier (CUTLASS's NamedBarrier has none).
template <class Id>
CUTLASS_DEVICE void named_barrier_sync(int num_threads, Id id, int sub = 0) {
  const uint32_t hw_id = cutlass::arch::NamedBarrier::ReservedNamedBarrierCount + static_cast<uint32_t>(id) + sub;
  asm volatile("bar.sync %0, %1;" ::"r"(hw_id), "r"(num_threads) : "memory");
}
template <class Id>
CUTLASS_DEVICE void named_barrier_arrive(int num_threads, Id id, int sub = 0) {
  const uint32_t hw_id = cutlass::arch::NamedBarrier::ReservedNamedBarrierCount + static_cast<uint32_t>(id) + sub;
  asm volatile("bar.arrive %0, %1;" ::"r"(hw_id), "r"(num_threads) : "memory");
}

}  // namespace fa3

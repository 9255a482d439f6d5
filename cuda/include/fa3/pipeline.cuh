// mbarrier pipelines and named barriers used by the warp-specialised kernels (docs/kernels.md §2.2, §2.6).
//
// A stage has a "full" barrier (count 1: the producer's arrive.expect_tx; TMA completes the transaction) and an
// "empty" barrier (count = consumer warps: lane 0 of each consumer warp arrives once the warp's WGMMA reading the
// stage has retired). Per-warp rather than per-thread arrivals keep the release cheap (docs/kernels.md §2.2:
// per-thread arrivals regressed FA3) while never assuming that the four warps of a warpgroup retire their WGMMA waits together.
#pragma once

#include <cstdint>

#include "cutlass/arch/barrier.h"

namespace fa3 {

// Named barrier ids, offset past the ids CUTLASS reserves (cutlass::arch::NamedBarrier adds
// ReservedNamedBarrierCount to these).
enum class FwdBarrier : uint32_t {
  kConsumers = 0,   // all consumer threads (epilogue, when O is staged in Q's SMEM)
  kPingpong0 = 1,   // pingpong (docs/kernels.md §2.6): warpgroup w (< 3) waits on kPingpong0 + w before its GEMMs
  kEpilogue0 = 4,   // consumer warpgroup w's own epilogue barrier: kEpilogue0 + w
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

template <int kStages>
struct TmaPipeline {
  uint64_t full[kStages];
  uint64_t empty[kStages];

  CUTLASS_DEVICE void init(int consumer_arrivals) {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], consumer_arrivals);
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
  // Called by every thread of a consumer warp after its WGMMA reading the stage was waited on.
  CUTLASS_DEVICE void consumer_release(PipeState<kStages> const& st) { warp_arrive(&empty[st.index]); }
};

CUTLASS_DEVICE void named_barrier_sync(int num_threads, FwdBarrier id, int sub = 0) {
  cutlass::arch::NamedBarrier::sync(num_threads, static_cast<uint32_t>(id) + sub);
}
CUTLASS_DEVICE void named_barrier_arrive(int num_threads, FwdBarrier id, int sub = 0) {
  cutlass::arch::NamedBarrier::arrive(num_threads, static_cast<uint32_t>(id) + sub);
}

}  // namespace fa3

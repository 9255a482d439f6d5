// Forward mainloop: TMA producer and WGMMA consumers for one (m-block, head, batch) tile (docs/kernels.md
// §2.2-2.6).
//
// Producer (one elected thread): the first K block, Q (once the consumers freed Q's buffer from the previous tile),
// then the other K/V blocks in descending order, K one block ahead of V.
// Consumers (kNumMmaWarpGroups x 64 rows): S = Q K_n^T (SS), softcap, mask on boundary blocks only, online
// softmax, O = O * rescale + P V_n (RS), with the P V GEMM of block n+1 overlapping the softmax of block n.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"

#include "fa3/fragment.cuh"
#include "fa3/fwd_traits.cuh"
#include "fa3/mask.cuh"
#include "fa3/pipeline.cuh"
#include "fa3/sequences.h"
#include "fa3/softcap.cuh"
#include "fa3/softmax.cuh"
#include "fa3/visibility.h"
#include "fa3/wgmma.cuh"

namespace fa3 {

template <class Traits>
struct FwdMainloop {
  using Element = typename Traits::Element;
  using Args = FwdArgs<Traits>;
  using Storage = typename Traits::SharedStorage;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kStages = Traits::kStages;

  // Positions in the K and V pipelines. Each side (producer thread, every consumer thread) keeps its own copy for the
  // whole CTA: a persistent CTA's tiles continue the same stage/phase sequence.
  struct PipeStates {
    PipeState<kStages> k, v;
  };

  CUTE_DEVICE static void prefetch_descriptors(Args const& args) {
    cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
  }

  // Run by one thread, for a tile with a non-empty range. tiles_loaded: tiles this CTA loaded before (Q's buffer is
  // reused from the second on).
  CUTE_DEVICE static void load(Args const& args, Storage& smem, int m_block, int head, Sequence const& seq,
                               BlockRange const& range, PipeStates& st, int tiles_loaded) {
    using namespace cute;
    const int kv_head = head / args.head_group;
    Tensor sQ = make_tensor(make_smem_ptr(smem.qo.q_data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutV{});
    // The sequence's rows: blocks are counted from its first row. A block reaching past the sequence's end reads
    // the next sequence's rows (packed), which the mask hides (K, V) or no store writes back (Q).
    Tensor mQ = domain_offset(make_coord(seq.q_offset, _0{}),
                              args.tma_q.get_tma_tensor(args.shape_q)(_, _, head, seq.q_batch));
    Tensor mK = domain_offset(make_coord(seq.k_offset, _0{}),
                              args.tma_k.get_tma_tensor(args.shape_k)(_, _, kv_head, seq.k_batch));
    Tensor mV = domain_offset(make_coord(seq.k_offset, _0{}),
                              args.tma_v.get_tma_tensor(args.shape_v)(_, _, kv_head, seq.k_batch));
    Tensor gQ = local_tile(mQ, Shape<typename Traits::BM, typename Traits::D>{}, make_coord(m_block, _0{}));
    Tensor gK = local_tile(mK, Shape<typename Traits::BN, typename Traits::D>{}, make_coord(_, _0{}));
    Tensor gV = local_tile(mV, Shape<typename Traits::BN, typename Traits::DV>{}, make_coord(_, _0{}));
    auto part_q = tma_partition(args.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    Tensor tQg = get<0>(part_q);  // (TMA)
    Tensor tQs = get<1>(part_q);  // (TMA)
    auto part_k = tma_partition(args.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    Tensor tKg = get<0>(part_k);  // (TMA, blocks)
    Tensor tKs = get<1>(part_k);  // (TMA, stages)
    auto part_v = tma_partition(args.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    Tensor tVg = get<0>(part_v);  // (TMA, blocks)
    Tensor tVs = get<1>(part_v);  // (TMA, stages)

    auto load_k = [&](int n) {
      smem.pipe_k.producer_acquire(st.k, Traits::kBytesK);
      copy(args.tma_k.with(smem.pipe_k.full[st.k.index]), tKg(_, n), tKs(_, st.k.index));
      st.k.advance();
    };
    auto load_v = [&](int n) {
      smem.pipe_v.producer_acquire(st.v, Traits::kBytesV);
      copy(args.tma_v.with(smem.pipe_v.full[st.v.index]), tVg(_, n), tVs(_, st.v.index));
      st.v.advance();
    };

    // The first K block does not depend on Q's buffer: issue it before waiting for the consumers to free Q, so
    // that it streams in while they finish the previous tile.
    load_k(range.n_max - 1);
    if (tiles_loaded > 0) cutlass::arch::ClusterBarrier::wait(&smem.bar_q_empty, uint32_t(tiles_loaded - 1) & 1u);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.bar_q, Traits::kBytesQ);
    copy(args.tma_q.with(smem.bar_q), tQg, tQs);
    // K runs one block ahead of V: the consumers' iteration n needs K_n and V_{n+1} (intra-warpgroup overlap).
    for (int n = range.n_max - 2; n >= range.n_min; --n) {
      load_k(n);
      load_v(n + 1);
    }
    load_v(range.n_min);
  }

  // Pingpong turns (docs/kernels.md §2.6) run as one sequence over all tiles of the CTA, round robin over the
  // consumer warpgroups (two, or three with the 192-row tile): warpgroup 0 issues first, each GEMM batch waits for the
  // warpgroup's turn and passes it to the next warpgroup right after issuing. The last warpgroup opens the sequence
  // with one pass before its first tile, so warpgroup 0 closes it with one extra wait after its last tile: arrivals
  // and waits then balance on every barrier, however many tiles (possibly none) the CTA ran.
  CUTE_DEVICE static void pingpong_open(int thread_idx) {
    if constexpr (Traits::Tile::kPingpong) {
      if (thread_idx / 128 == Traits::kNumMmaWarpGroups - 1) named_barrier_arrive(2 * 128, FwdBarrier::kPingpong0, 0);
    }
  }
  CUTE_DEVICE static void pingpong_close(int thread_idx) {
    if constexpr (Traits::Tile::kPingpong) {
      if (thread_idx / 128 == 0) named_barrier_sync(2 * 128, FwdBarrier::kPingpong0, 0);
    }
  }

  // Consumer part of one tile with a non-empty range. tOrO and softmax: this thread's O accumulator (zero) and
  // statistics (2 rows per thread); q_phase: parity of the tile's Q load (tiles this CTA computed before, mod 2).
  //
  // Intra-warpgroup overlap (docs/kernels.md §2.5): iteration n issues S = Q K_n^T and O += P_{n+1} V_{n+1} back to
  // back, then runs the softmax of S_n while the P V GEMM is still in flight; O is rescaled once that GEMM has retired.
  // Pingpong (docs/kernels.md §2.6, kPingpong): each warpgroup waits for its turn before issuing an iteration's GEMMs
  // and hands the turn to the next warpgroup right after issuing, so one warpgroup's softmax overlaps the others'
  // GEMMs.
  template <class FragO>
  CUTE_DEVICE static void mma(Args const& args, Storage& smem, int thread_idx, int m_block, Visibility const& vis,
                              BlockRange const& range, FragO& tOrO, OnlineSoftmax<2>& softmax,
                              PipeStates& st, uint32_t q_phase) {
    using namespace cute;
    constexpr bool kPingpong = Traits::Tile::kPingpong;
    typename Traits::TiledMmaQK mma_qk;
    typename Traits::TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_slice(thread_idx);
    // The SMEM operand descriptors depend only on the warpgroup. Sliced per thread, d >= 192 had its 12-16
    // loop-invariant Q descriptors (64-bit each) hoisted into ordinary registers and spilled (d=256: 248 B, ptxas);
    // sliced with a warp-uniform index they live in uniform registers, spill-free. The 128-register cap of three
    // consumer warpgroups needs the same (d=64 192-row tile: 144 -> 48 B). With two warpgroups at d <= 128 neither
    // of two A/B runs showed a gain from the uniform slice (benchmarks/NOTES_fwd.md v6): the per-thread one stays.
    constexpr bool kUniformSlice = Traits::kHeadDim > 128 || Traits::kNumMmaWarpGroups > 2;
    const int operand_thread = kUniformSlice ? __shfl_sync(0xffffffff, thread_idx / 128, 0) * 128 : thread_idx;
    auto operands_qk = mma_qk.get_slice(operand_thread);
    auto operands_pv = mma_pv.get_slice(operand_thread);
    Tensor sQ = make_tensor(make_smem_ptr(smem.qo.q_data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});
    Tensor tSrQ = operands_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K) descriptors
    Tensor tSrK = operands_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stages)
    Tensor tOrV = operands_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stages)
    Tensor cS = make_identity_tensor(Shape<typename Traits::BM, typename Traits::BN>{});
    Tensor tScS = thr_qk.partition_C(cS);
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    Tensor tOrO_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    using LayoutS = decltype(partition_fragment_C(mma_qk, Shape<typename Traits::BM, typename Traits::BN>{}).layout());
    // P (16-bit) as the register-A operand of P V; written after the softmax of each block.
    Tensor tOrP = make_tensor<Element>(acc_as_a_operand(LayoutS{}));

    const int row0 = m_block * kBlockM;
    const int wg = thread_idx / 128;
    // The warpgroup after this one in the turn order (written as 1 - wg for two: the code measured before the ring).
    constexpr int kWarpGroups = Traits::kNumMmaWarpGroups;
    const int next_wg = kWarpGroups == 2 ? 1 - wg : (wg + 1) % kWarpGroups;
    PipeState<kStages>& st_k = st.k;
    PipeState<kStages>& st_v = st.v;

    auto turn_wait = [&] {
      if constexpr (kPingpong) named_barrier_sync(2 * 128, FwdBarrier::kPingpong0, wg);
    };
    auto turn_pass = [&] {
      if constexpr (kPingpong) named_barrier_arrive(2 * 128, FwdBarrier::kPingpong0, next_wg);
    };
    auto scores = [&](auto& tSrS, int n, auto masked) {
      if (args.has_softcap) apply_softcap(tSrS, args.softcap_pre);
      Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
      if constexpr (decltype(masked)::value) {
        apply_mask(s_rc, tScS_rc, row0, n * kBlockN, vis);
      }
    };
    auto to_p = [&](auto& tSrS) {
      Tensor rP = convert_fragment<Element>(tSrS);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrP); ++i) tOrP(i) = rP(i);
    };

    cutlass::arch::ClusterBarrier::wait(&smem.bar_q, q_phase);
    int n = range.n_max - 1;
    {  // First block: S only. It holds the diagonal or the seqlen_k tail if any block does; without them (no mask,
       // seqlen_k a multiple of kBlockN) it skips the mask, which at 4-8 blocks per tile is a sizeable share of the
       // softmax work (NOTES_fwd.md v9).
      Tensor tSrS = partition_fragment_C(mma_qk, Shape<typename Traits::BM, typename Traits::BN>{});
      smem.pipe_k.consumer_wait(st_k);
      turn_wait();
      wgmma_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, st_k.index), tSrS);
      turn_pass();
      warpgroup_wait<0>();
      smem.pipe_k.consumer_release(st_k);
      st_k.advance();
      // Two compiled copies: a runtime branch around the mask alone cost causal tiles 1-4 % (v9).
      auto first_softmax = [&](auto masked) {
        scores(tSrS, n, masked);
        float rescale[2];
        Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
        softmax.update(s_rc, rescale);  // O is still zero: no rescale
      };
      if (n >= range.n_unmasked_max || n < range.n_unmasked_min) {
        first_softmax(cute::true_type{});
      } else {
        first_softmax(cute::false_type{});
      }
      to_p(tSrS);
    }

    auto step = [&](int n, auto masked) {
      Tensor tSrS = partition_fragment_C(mma_qk, Shape<typename Traits::BM, typename Traits::BN>{});
      smem.pipe_k.consumer_wait(st_k);
      turn_wait();
      wgmma_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, st_k.index), tSrS);
      smem.pipe_v.consumer_wait(st_v);
      wgmma_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, st_v.index), tOrO);
      turn_pass();
      warpgroup_wait<1>();  // S_n ready; P V still running
      smem.pipe_k.consumer_release(st_k);
      st_k.advance();
      scores(tSrS, n, masked);
      float rescale[2];
      Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
      softmax.update(s_rc, rescale);
      warpgroup_wait<0>();  // P V done: O and P may be touched again
      smem.pipe_v.consumer_release(st_v);
      st_v.advance();
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(tOrO_rc); ++c) tOrO_rc(r, c) *= rescale[r];
      }
      to_p(tSrS);
    };

    --n;
    const int unmasked_hi = max(range.n_unmasked_max, range.n_min);
    const int unmasked_lo = max(range.n_unmasked_min, range.n_min);
    for (; n >= unmasked_hi; --n) step(n, cute::true_type{});
    for (; n >= unmasked_lo; --n) step(n, cute::false_type{});
    for (; n >= range.n_min; --n) step(n, cute::true_type{});
    // Every Q K^T of this warp has retired: the producer may refill Q for the next tile during the last P V and
    // the epilogue.
    warp_arrive(&smem.bar_q_empty);

    // Last block's P V.
    smem.pipe_v.consumer_wait(st_v);
    turn_wait();
    wgmma_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, st_v.index), tOrO);
    turn_pass();
    warpgroup_wait<0>();
    smem.pipe_v.consumer_release(st_v);
    st_v.advance();
  }
};

}  // namespace fa3

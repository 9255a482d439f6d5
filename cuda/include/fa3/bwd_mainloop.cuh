// Backward mainloop: TMA producer and WGMMA consumers for one tile (key block, kv head, sequence) (docs/kernels.md
// §3.3-3.6).
//
// Producer (one thread): the tile's K and V once (one transaction barrier, kv_barrier), into the buffers the previous
// tile's epilogue staged dK and dV in (kv_empty); then Q, dO and the rows' lse / D of every (query head of the GQA
// group, visited M-block) through the kStages-deep TMA pipeline.
// Consumers (two warpgroups), per (query head, M-block) iteration, in one of two forms (bwd_traits.cuh):
//   RS (d <= 128)                         SS (d = 192, 256)
//   S^T = K Q^T, dP^T = V dO^T            S = Q K^T, dP = dO V^T               (SS, accumulators in registers)
//   P^T, dS^T elementwise                 P, dS elementwise                    (bwd_softmax.cuh)
//   dS -> SMEM                            P, dS -> SMEM                        (stmatrix, 16-bit)
//   dV += P^T dO (P^T from registers)     dV += P^T dO, dK += dS^T Q           (accumulators live across the loop)
//   dQ_partial = dS K                     dQ_partial = dS K
//   dK += dS^T Q (dS^T from registers),
//   overlapping the dQ add
// The dQ partial is added into the fp32 workspace (bwd_dq.cuh): staged in SMEM for the writer warp, or per-thread
// vector reductions.
#pragma once

#include "cute/tensor.hpp"
#include "cute/atom/copy_traits_sm90.hpp"
#include "cutlass/arch/barrier.h"

#include "fa3/bwd_block_order.cuh"
#include "fa3/bwd_dq.cuh"
#include "fa3/bwd_softmax.cuh"
#include "fa3/bwd_traits.cuh"
#include "fa3/fragment.cuh"
#include "fa3/pipeline.cuh"
#include "fa3/wgmma.cuh"

namespace fa3 {
namespace bwd {

template <class Traits>
struct BwdMainloop {
  using Element = typename Traits::Element;
  using Args = BwdArgs<Traits>;
  using Storage = typename Traits::SharedStorage;
  using BM = typename Traits::BM;
  using BN = typename Traits::BN;
  using D = typename Traits::D;
  using DV = typename Traits::DV;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  // Position in the Q / dO pipeline. Each side (the producer thread, every consumer thread) keeps its own copy for
  // the whole CTA: the tiles of a CTA continue the same stage / phase sequence.
  using Stage = PipeState<Traits::kStages>;

  // The iterations of a tile: every query head of the GQA group, and for each the visited M-blocks in order.
  CUTE_DEVICE static QueryTileCursor first_query_tile(Args const& args, BwdTile const& w) {
    return QueryTileCursor{w.cta.kv_head * args.group, w.mr.lo, w.mr.lo, w.mr.hi};
  }
  // First workspace row (lse, D, dQ accumulator) of the (head, M-block) iteration.
  CUTE_DEVICE static int64_t ws_row(Args const& args, BwdTile const& w, int head, int m_block) {
    return w.ws_row0 + head * args.ws_rows.head_rows + m_block * kBlockM;
  }
  CUTE_DEVICE static float* dq_tile(Args const& args, BwdTile const& w, int head, int m_block) {
    return args.dq_accum + ws_row(args, w, head, m_block) * kHeadDim;
  }

  // Producer thread. tiles_before: the CTA's tiles before this one (kv_empty's phase).
  CUTE_DEVICE static void load(Args const& args, Storage& ss, BwdTile const& w, int tiles_before, Stage& st) {
    using namespace cute;
    using Barrier = cutlass::arch::ClusterTransactionBarrier;
    if (tiles_before > 0) cutlass::arch::ClusterBarrier::wait(&ss.kv_empty, uint32_t(tiles_before - 1) & 1u);
    if (w.n_iters == 0) return;
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutdO{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutV{});
    Tensor mK = args.tma_k.get_tma_tensor(args.shape_k);
    Tensor mV = args.tma_v.get_tma_tensor(args.shape_v);
    Tensor mQ = args.tma_q.get_tma_tensor(args.shape_q);
    Tensor mdO = args.tma_do.get_tma_tensor(args.shape_do);
    // Blocks count from the sequence's first row (fa3/sequences.h); rows of a block past the sequence's end are
    // masked (K, V) or have P = 0 (Q, dO: lse = +inf).
    Tensor gK = local_tile(domain_offset(make_coord(w.seq.k_offset, _0{}), mK(_, _, w.cta.kv_head, w.seq.k_batch)),
                           Shape<BN, D>{}, make_coord(w.cta.n_block, _0{}));
    Tensor gV = local_tile(domain_offset(make_coord(w.seq.k_offset, _0{}), mV(_, _, w.cta.kv_head, w.seq.k_batch)),
                           Shape<BN, DV>{}, make_coord(w.cta.n_block, _0{}));
    auto [tKgK, tKsK] = tma_partition(args.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                      group_modes<0, 2>(gK));
    auto [tVgV, tVsV] = tma_partition(args.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                      group_modes<0, 2>(gV));
    Barrier::arrive_and_expect_tx(&ss.kv_barrier, Traits::kTmaBytesKV);
    copy(args.tma_k.with(ss.kv_barrier), tKgK, tKsK);
    copy(args.tma_v.with(ss.kv_barrier), tVgV, tVsV);

    QueryTileCursor t = first_query_tile(args, w);
    for (int it = 0; it < w.n_iters; ++it, t.next()) {
      Tensor gQ = local_tile(domain_offset(make_coord(w.seq.q_offset, _0{}), mQ(_, _, t.head, w.seq.q_batch)),
                             Shape<BM, D>{}, make_coord(t.m_block, _0{}));
      Tensor gdO = local_tile(domain_offset(make_coord(w.seq.q_offset, _0{}), mdO(_, _, t.head, w.seq.q_batch)),
                              Shape<BM, DV>{}, make_coord(t.m_block, _0{}));
      auto [tQgQ, tQsQ] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                        group_modes<0, 2>(gQ));
      auto [tdOgdO, tdOsdO] = tma_partition(args.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO),
                                            group_modes<0, 2>(gdO));
      const int64_t row_base = ws_row(args, w, t.head, t.m_block);
      ss.pipe.producer_acquire(st, Traits::kTmaBytesPerStage);
      uint64_t* bar = &ss.pipe.full[st.index];
      copy(args.tma_q.with(*bar), tQgQ, tQsQ(_, st.index));
      copy(args.tma_do.with(*bar), tdOgdO, tdOsdO(_, st.index));
      SM90_BULK_COPY_G2S::copy(args.lse_log2 + row_base, bar, ss.lse[st.index], Traits::kRowStatBytes);
      SM90_BULK_COPY_G2S::copy(args.dsum + row_base, bar, ss.dsum[st.index], Traits::kRowStatBytes);
      st.advance();
    }
  }

  // Consumer threads (tid: 0..255): dV and dK of the tile accumulate into tdVrdV / tdKrdK (cleared by the caller),
  // over its n_iters iterations (at least one). kv_phase: kv_barrier's phase for this tile's K / V. dq_bulk: dQ
  // partials go to the writer warp (bwd_dq.cuh).
  template <class TdV, class TdK>
  CUTE_DEVICE static void mma(Args const& args, Storage& ss, int tid, BwdTile const& w, uint32_t kv_phase,
                              bool dq_bulk, Stage& st, TdV& tdVrdV, TdK& tdKrdK) {
    using namespace cute;
    constexpr bool kRS = Traits::kRS;
    static_assert(Traits::kStagesPdS == 2, "the P / dS reuse argument below needs two buffers");
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutdO{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutV{});
    Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), typename Traits::SmemLayoutPdS{});
    Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), typename Traits::SmemLayoutPdSt{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutdOt{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKt{});

    typename Traits::TiledMmaSdP mma_sdp;
    typename Traits::TiledMmadV mma_dv;
    typename Traits::TiledMmadK mma_dk;
    typename Traits::TiledMmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_dv = mma_dv.get_thread_slice(tid);
    auto thr_dk = mma_dk.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(tid);

    // S (or S^T) = A B^T with A, B = (Q, K), or (K, Q) in the RS form; likewise dP with (dO, V).
    Tensor tSrA = thr_sdp.partition_fragment_A(conditional_return<kRS>(sK, sQ));  // (MMA, MMA_M, MMA_K[, stage])
    Tensor tSrB = thr_sdp.partition_fragment_B(conditional_return<kRS>(sQ, sK));  // (MMA, MMA_N, MMA_K[, stage])
    Tensor tdPrA = thr_sdp.partition_fragment_A(conditional_return<kRS>(sV, sdO));
    Tensor tdPrB = thr_sdp.partition_fragment_B(conditional_return<kRS>(sdO, sV));
    auto at_stage = [](auto const& t, int stage) {  // the Q / dO operand's pipeline stage
      if constexpr (rank_v<std::decay_t<decltype(t)>> == 4) return t(_, _, _, stage);
      else return t;
    };
    Tensor tdVrdOt = thr_dv.partition_fragment_B(sdOt);  // (MMA, MMA_N, MMA_K, stage)
    Tensor tdKrQt = thr_dk.partition_fragment_B(sQt);
    Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);    // (MMA, MMA_M, MMA_K, pds stage)
    Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);

    // Tile coordinates of the S/dP registers, as (rows, cols).
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(typename Traits::ShapeSdP{}));
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

    // P and dS leave the registers as 16-bit values through stmatrix (four 8x8 tiles per instruction; transposing
    // ones for the RS form's dS^T, which lands in the same K-major dS buffer). The position-independent view applies
    // the swizzle to the SMEM address bits, so each thread's offsets are constants. (Element-wise 32-bit stores with
    // the swizzle computed per store cost ~12 instructions per pair: measured +10 % at d=128, +16 % at d=64, +8-10 %
    // at d=256 from this change alone, NOTES_bwd.md v4.)
    using StoreAtom = std::conditional_t<kRS, SM90_U16x8_STSM_T, SM90_U32x4_STSM_N>;
    auto copy_pds = make_tiled_copy_C(Copy_Atom<StoreAtom, Element>{}, mma_sdp);
    auto thr_copy_pds = copy_pds.get_thread_slice(tid);
    Tensor tdSsdS =
        thr_copy_pds.partition_D(as_position_independent_swizzle_tensor(conditional_return<kRS>(sdSt, sdS)));
    auto store_pds = [&](auto const& half, auto& dst, int buf) {
      copy(copy_pds, thr_copy_pds.retile_S(half), dst(_, _, _, buf));
    };

    // Adds this iteration's dQ partial into its workspace tile.
    auto add_dq = [&](auto const& tdQrdQ, int head, int m_block) {
      if constexpr (Traits::kdQViaSmem) {
        if (dq_bulk) {
          dq_hand_off(tdQrdQ, ss.dq.data(), tid);
          return;
        }
      }
      float* tile = dq_tile(args, w, head, m_block);
      if (args.deterministic) {
        int* sem = args.dq_sem + ws_row(args, w, head, m_block) / kBlockM;
        dq_wait_turn(sem, w.cta.n_block - w.seq.vis.first_key_block(m_block, kBlockM, kBlockN), tid);
        dq_accumulate(tdQrdQ, tile, tid);
        dq_pass_turn(sem, tid);
      } else {
        dq_accumulate(tdQrdQ, tile, tid);
      }
    };

    cutlass::arch::ClusterTransactionBarrier::wait(&ss.kv_barrier, kv_phase);
    QueryTileCursor t = first_query_tile(args, w);
    for (int it = 0; it < w.n_iters; ++it, t.next()) {
      const int head = t.head, m_block = t.m_block;
      const int stage = st.index;
      const int pds = it & 1;  // P / dS buffer

      ss.pipe.consumer_wait(st);
      Tensor tSrS = partition_fragment_C(mma_sdp, typename Traits::ShapeSdP{});
      Tensor tdPrdP = partition_fragment_C(mma_sdp, typename Traits::ShapeSdP{});
      wgmma_gemm<true>(mma_sdp, at_stage(tSrA, stage), at_stage(tSrB, stage), tSrS);
      wgmma_gemm<true>(mma_sdp, at_stage(tdPrA, stage), at_stage(tdPrB, stage), tdPrdP);

      Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
      Tensor dp_rc = make_tensor(tdPrdP.data(), acc_rowcol(tdPrdP.layout()));
      const int q0 = m_block * kBlockM, k0 = w.cta.n_block * kBlockN;
      const bool need_mask = w.seq.vis.tile_needs_mask(m_block, w.cta.n_block, kBlockM, kBlockN);
      auto to_grads = [&](auto mask, auto softcap) {
        scores_to_grads<decltype(mask)::value, decltype(softcap)::value, kRS>(
            s_rc, dp_rc, tScS_rc, ss.lse[stage], ss.dsum[stage], q0, k0, w.seq.vis, args.scale_log2,
            args.softcap_pre);
      };
      warpgroup_wait<0>();
      if (args.has_softcap) {
        if (need_mask) to_grads(true_type{}, true_type{});
        else to_grads(false_type{}, true_type{});
      } else {
        if (need_mask) to_grads(true_type{}, false_type{});
        else to_grads(false_type{}, false_type{});
      }
      Tensor rP = convert_fragment<Element>(tSrS);
      Tensor rdS = convert_fragment<Element>(tdPrdP);

      if constexpr (kRS) {
        // dS^T -> SMEM for dQ; dV from P^T in registers meanwhile. Buffer pds was last read by the dQ GEMMs of
        // iteration it - 2, which both warpgroups waited for before the consumer barrier of iteration it - 1.
        store_pds(rdS, tdSsdS, pds);
        Tensor tdVrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
        wgmma_gemm<false>(mma_dv, tdVrP, tdVrdOt(_, _, _, stage), tdVrdV);
        // Generic-proxy SMEM writes must be visible to the async proxy (WGMMA) of both warpgroups.
        cutlass::arch::fence_view_async_shared();
        consumer_sync();
        Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<BM, D>{});
        wgmma_gemm<true>(mma_dq, tdQrdS(_, _, _, pds), tdQrKt, tdQrdQ);
        warpgroup_wait<1>();  // dV
        warpgroup_fence_operand(tdVrP);
        Tensor tdKrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));
        wgmma_gemm<false>(mma_dk, tdKrdS, tdKrQt(_, _, _, stage), tdKrdK);
        warpgroup_wait<1>();  // dQ; its add overlaps the dK GEMM
        warpgroup_fence_operand(tdQrdQ);
        add_dq(tdQrdQ, head, m_block);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tdKrdS);
        ss.pipe.consumer_release(st);
        st.advance();
      } else {
        Tensor sP = make_tensor(make_smem_ptr(ss.p.data()), typename Traits::SmemLayoutPdS{});
        Tensor sPt = make_tensor(make_smem_ptr(ss.p.data()), typename Traits::SmemLayoutPdSt{});
        Tensor tPsP = thr_copy_pds.partition_D(as_position_independent_swizzle_tensor(sP));  // (CPY, M, N, pds)
        Tensor tdVrPt = thr_dv.partition_fragment_A(sPt);                                  // (MMA, M, K, pds)
        Tensor tdKrdSt = thr_dk.partition_fragment_A(sdSt);
        // Buffer pds was last read by the GEMMs of iteration it - 2, as in the RS branch.
        store_pds(rP, tPsP, pds);
        store_pds(rdS, tdSsdS, pds);
        cutlass::arch::fence_view_async_shared();  // as in the RS branch
        consumer_sync();
        Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<BM, D>{});
        // Where dQ leaves by per-thread vector reductions, its GEMM goes first so that the reductions are issued
        // while the dV and dK GEMMs run (d=256: +11-14 %). The SMEM hand-off (d=192) is short; dQ first measured 1-2 %
        // slower there (NOTES_bwd.md v9).
        constexpr bool kdQFirst = !Traits::kdQViaSmem;
        if constexpr (kdQFirst) wgmma_gemm<true>(mma_dq, tdQrdS(_, _, _, pds), tdQrKt, tdQrdQ);
        wgmma_gemm<false>(mma_dv, tdVrPt(_, _, _, pds), tdVrdOt(_, _, _, stage), tdVrdV);
        wgmma_gemm<false>(mma_dk, tdKrdSt(_, _, _, pds), tdKrQt(_, _, _, stage), tdKrdK);
        if constexpr (kdQFirst) {
          warpgroup_wait<2>();  // dQ
          warpgroup_fence_operand(tdQrdQ);
          add_dq(tdQrdQ, head, m_block);
          warpgroup_wait<0>();
          ss.pipe.consumer_release(st);
          st.advance();
        } else {
          wgmma_gemm<true>(mma_dq, tdQrdS(_, _, _, pds), tdQrKt, tdQrdQ);
          warpgroup_wait<0>();
          ss.pipe.consumer_release(st);
          st.advance();
          add_dq(tdQrdQ, head, m_block);
        }
      }
    }
  }
};

}  // namespace bwd
}  // namespace fa3

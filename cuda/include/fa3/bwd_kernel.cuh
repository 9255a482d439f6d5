// Backward main kernel (docs/kernels.md §3.3): KV-stationary, one CTA per (key block, kv head, sequence), or, where
// that grid would be mostly empty (packed keys of many short or empty sequences), per block of the key tensor's rows,
// running the key tiles that start there one after another (BwdTiles, bwd_block_order.cuh); key blocks past their
// sequence's keys are skipped by every role alike.
//
// Warpgroup 0 is the producer: thread 0 loads a tile's K and V once (one transaction barrier), then streams Q, dO and the
// rows' lse / D of every (query head of the GQA group, visited M-block) through a 2-stage TMA pipeline; on the bulk
// dQ path its warp 1 is the dQ writer (bwd_dq.cuh). Warpgroups 1-2 consume, in one of two forms (bwd_traits.cuh):
//   RS (d <= 128)                         SS (d = 192, 256)
//   S^T = K Q^T, dP^T = V dO^T            S = Q K^T, dP = dO V^T               (SS, accumulators in registers)
//   P^T, dS^T elementwise                 P, dS elementwise                    (bwd_mainloop.cuh)
//   dS -> SMEM                            P, dS -> SMEM                        (stmatrix, 16-bit)
//   dV += P^T dO (P^T from registers)     dV += P^T dO, dK += dS^T Q           (accumulators live across the loop)
//   dQ_partial = dS K                     dQ_partial = dS K
//   dK += dS^T Q (dS^T from registers),
//   overlapping the dQ add
// The dQ partial is added into the fp32 workspace (bwd_dq.cuh): staged in SMEM and added by one bulk reduce per
// warpgroup, or per-thread vector reductions.
// Looping over the query heads of a GQA group inside the CTA keeps dK/dV in registers: no dK/dV workspace and no
// cross-CTA reduction for GQA/MQA (deterministic by construction); the cost is fewer CTAs when h_k * b is small.
#pragma once

#include "cute/tensor.hpp"
#include "cute/atom/copy_traits_sm90.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"
#include "cutlass/pipeline/sm90_pipeline.hpp"

#include "fa3/bwd_block_order.cuh"
#include "fa3/bwd_dq.cuh"
#include "fa3/bwd_mainloop.cuh"
#include "fa3/bwd_traits.cuh"
#include "fa3/fragment.cuh"
#include "fa3/sequences.h"

namespace fa3 {
namespace bwd {

// kVarlen: sequences of their own lengths and offsets (fa3/sequences.h), else every sequence is the tensors' seqlen.
template <class Traits, bool kVarlen>
__global__ void __launch_bounds__(Traits::kNumThreads, 1) bwd_kernel(const __grid_constant__ BwdArgs<Traits> args) {
  using namespace cute;
  using Element = typename Traits::Element;
  using BM = typename Traits::BM;
  using BN = typename Traits::BN;
  using D = typename Traits::D;
  using DV = typename Traits::DV;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::MainloopPipeline;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;

  extern __shared__ char smem_raw[];
  SharedStorage& ss =
      *reinterpret_cast<SharedStorage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int warp_group = threadIdx.x / 128;
  // Bulk dQ path (bwd_dq.cuh): consumers stage their dQ partials in SMEM, the writer warp adds them.
  const bool dq_bulk = Traits::kdQViaSmem && !args.deterministic;

  // Every role runs its part of each of the CTA's tiles, in the same order, and skips alike the key blocks past their
  // sequence's keys. Without kVarlen the CTA has one tile, whose coordinates and rule the compiler keeps in parameter
  // space as before tiles were walked (a loop over them spilled ~1.8 KB there).
  struct Work {
    CtaCoord cta;
    Sequence seq;
    Range mr;     // the M-blocks the key block visits
    int n_iters;  // (query head, M-block) iterations
    int64_t ws_row0;
  };
  auto for_each_tile = [&](auto&& f) {
    auto run = [&](CtaCoord const& cta) {
      const Sequence seq = args.seqs.template at<kVarlen>(cta.batch);
      if (cta.n_block * kBlockN >= seq.vis.seqlen_k) return;  // no rows to compute or write
      const Range mr = seq.vis.query_blocks(cta.n_block, kBlockM, kBlockN);
      const int n_iters = (mr.hi >= mr.lo ? mr.hi - mr.lo + 1 : 0) * args.group;
      f(Work{cta, seq, mr, n_iters, args.ws_rows.first_row(cta.batch, seq.q_offset)});
    };
    if constexpr (kVarlen) {
      CtaCoord cta;
      for (int cursor = BwdTiles<kBlockN>::first(args); BwdTiles<kBlockN>::next(args, cursor, cta);) run(cta);
    } else {
      run(bwd_cta_coord(args.num_n_blocks, args.kv_heads, args.batch, args.pairs_per_group));
    }
  };
  auto ws_row = [&](Work const& w, int head, int m_block) {  // first workspace row of the (head, M-block) tile
    return w.ws_row0 + head * args.ws_rows.head_rows + m_block * kBlockM;
  };
  auto dq_tile_of = [&](Work const& w, int head, int m_block) {
    return args.dq_accum + ws_row(w, head, m_block) * kHeadDim;
  };
  auto first_query_tile = [&](Work const& w) {
    return QueryTileCursor{w.cta.kv_head * args.group, w.mr.lo, w.mr.lo, w.mr.hi};
  };

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kTmaBytesPerStage;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kNumMmaThreads;
  Pipeline pipeline(ss.pipe, pipe_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    Barrier::init(&ss.kv_barrier, 1);
    cutlass::arch::ClusterBarrier::init(&ss.kv_empty, 1);
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutdO{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutV{});

  if (warp_group == 0) {
    // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if constexpr (Traits::kdQViaSmem) {
      if (dq_bulk && threadIdx.x / 32 == 1) {
        dq_writer_open();
        for_each_tile([&](Work const& w) {
          dq_writer_tile<Traits::kdQPerThread * 128>(ss.dq.data(), first_query_tile(w), w.n_iters,
                                                     [&](int head, int m_block) { return dq_tile_of(w, head, m_block); });
        });
        dq_writer_close();
        return;
      }
    }
    if (threadIdx.x != 0) return;
    Tensor mK = args.tma_k.get_tma_tensor(args.shape_k);
    Tensor mV = args.tma_v.get_tma_tensor(args.shape_v);
    Tensor mQ = args.tma_q.get_tma_tensor(args.shape_q);
    Tensor mdO = args.tma_do.get_tma_tensor(args.shape_do);
    auto state = cutlass::make_producer_start_state<Pipeline>();
    int tiles_seen = 0;
    for_each_tile([&](Work const& w) {
      // K and V go into the buffers the previous tile's epilogue staged dK and dV in.
      if (tiles_seen > 0) cutlass::arch::ClusterBarrier::wait(&ss.kv_empty, uint32_t(tiles_seen - 1) & 1u);
      ++tiles_seen;
      if (w.n_iters == 0) return;
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

      QueryTileCursor t = first_query_tile(w);
      for (int it = 0; it < w.n_iters; ++it, t.next()) {
        const int head = t.head, m_block = t.m_block;
        Tensor gQ = local_tile(domain_offset(make_coord(w.seq.q_offset, _0{}), mQ(_, _, head, w.seq.q_batch)),
                               Shape<BM, D>{}, make_coord(m_block, _0{}));
        Tensor gdO = local_tile(domain_offset(make_coord(w.seq.q_offset, _0{}), mdO(_, _, head, w.seq.q_batch)),
                                Shape<BM, DV>{}, make_coord(m_block, _0{}));
        auto [tQgQ, tQsQ] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                          group_modes<0, 2>(gQ));
        auto [tdOgdO, tdOsdO] = tma_partition(args.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO),
                                              group_modes<0, 2>(gdO));
        const int64_t row_base = ws_row(w, head, m_block);
        pipeline.producer_acquire(state);
        uint64_t* bar = pipeline.producer_get_barrier(state);
        copy(args.tma_q.with(*bar), tQgQ, tQsQ(_, state.index()));
        copy(args.tma_do.with(*bar), tdOgdO, tdOsdO(_, state.index()));
        SM90_BULK_COPY_G2S::copy(args.lse_log2 + row_base, bar, ss.lse[state.index()], Traits::kRowStatBytes);
        SM90_BULK_COPY_G2S::copy(args.dsum + row_base, bar, ss.dsum[state.index()], Traits::kRowStatBytes);
        ++state;
      }
    });
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int tid = threadIdx.x - 128;
  constexpr bool kRS = Traits::kRS;
  static_assert(Traits::kStagesPdS == 2, "the P / dS reuse argument below needs two buffers");

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
  Tensor tSrA = thr_sdp.partition_fragment_A(conditional_return<kRS>(sK, sQ));   // (MMA, MMA_M, MMA_K[, stage])
  Tensor tSrB = thr_sdp.partition_fragment_B(conditional_return<kRS>(sQ, sK));   // (MMA, MMA_N, MMA_K[, stage])
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

  Tensor tdVrdV = partition_fragment_C(mma_dv, Shape<BN, DV>{});
  Tensor tdKrdK = partition_fragment_C(mma_dk, Shape<BN, D>{});

  // Tile coordinates of the S/dP registers, as (rows, cols).
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(typename Traits::ShapeSdP{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

  // P and dS leave the registers as 16-bit values through stmatrix (four 8x8 tiles per instruction; transposing ones
  // for the RS form's dS^T, which lands in the same K-major dS buffer). The position-independent view applies the
  // swizzle to the SMEM address bits, so each thread's offsets are constants. (Element-wise 32-bit stores with the
  // swizzle computed per store cost ~12 instructions per pair: measured +10 % at d=128, +16 % at d=64, +8-10 % at
  // d=256 from this change alone, NOTES_bwd.md v4.)
  using StoreAtom = std::conditional_t<kRS, SM90_U16x8_STSM_T, SM90_U32x4_STSM_N>;
  auto copy_pds = make_tiled_copy_C(Copy_Atom<StoreAtom, Element>{}, mma_sdp);
  auto thr_copy_pds = copy_pds.get_thread_slice(tid);
  Tensor tdSsdS =
      thr_copy_pds.partition_D(as_position_independent_swizzle_tensor(conditional_return<kRS>(sdSt, sdS)));
  auto store_pds = [&](auto const& half, auto& dst, int buf) {
    copy(copy_pds, thr_copy_pds.retile_S(half), dst(_, _, _, buf));
  };

  // Adds this iteration's dQ partial into its workspace tile.
  auto add_dq = [&](Work const& w, auto const& tdQrdQ, int head, int m_block) {
    if constexpr (Traits::kdQViaSmem) {
      if (dq_bulk) {
        dq_hand_off(tdQrdQ, ss.dq.data(), tid);
        return;
      }
    }
    float* dq_tile = dq_tile_of(w, head, m_block);
    if (args.deterministic) {
      int* sem = args.dq_sem + ws_row(w, head, m_block) / kBlockM;
      dq_wait_turn(sem, w.cta.n_block - w.seq.vis.first_key_block(m_block, kBlockM, kBlockN), tid);
      dq_accumulate(tdQrdQ, dq_tile, tid);
      dq_pass_turn(sem, tid);
    } else {
      dq_accumulate(tdQrdQ, dq_tile, tid);
    }
  };

  cutlass::PipelineState<Traits::kStages> state;
  int loaded = 0;  // tiles whose K / V were loaded: kv_barrier's phase
  for_each_tile([&](Work const& w) {
    clear(tdVrdV);
    clear(tdKrdK);
    if (w.n_iters > 0) {
      Barrier::wait(&ss.kv_barrier, uint32_t(loaded++) & 1u);
      QueryTileCursor t = first_query_tile(w);
      for (int it = 0; it < w.n_iters; ++it, t.next()) {
        const int head = t.head, m_block = t.m_block;
        const int stage = state.index();
        const int pds = it & 1;  // P / dS buffer

        pipeline.consumer_wait(state);
        Tensor tSrS = partition_fragment_C(mma_sdp, typename Traits::ShapeSdP{});
        Tensor tdPrdP = partition_fragment_C(mma_sdp, typename Traits::ShapeSdP{});
        issue_gemm<true>(mma_sdp, at_stage(tSrA, stage), at_stage(tSrB, stage), tSrS);
        issue_gemm<true>(mma_sdp, at_stage(tdPrA, stage), at_stage(tdPrB, stage), tdPrdP);

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
          issue_gemm<false>(mma_dv, tdVrP, tdVrdOt(_, _, _, stage), tdVrdV);
          // Generic-proxy SMEM writes must be visible to the async proxy (WGMMA) of both warpgroups.
          cutlass::arch::fence_view_async_shared();
          consumer_sync();
          Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<BM, D>{});
          issue_gemm<true>(mma_dq, tdQrdS(_, _, _, pds), tdQrKt, tdQrdQ);
          warpgroup_wait<1>();  // dV
          warpgroup_fence_operand(tdVrP);
          Tensor tdKrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));
          issue_gemm<false>(mma_dk, tdKrdS, tdKrQt(_, _, _, stage), tdKrdK);
          warpgroup_wait<1>();  // dQ; its add overlaps the dK GEMM
          warpgroup_fence_operand(tdQrdQ);
          add_dq(w, tdQrdQ, head, m_block);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tdKrdS);
          pipeline.consumer_release(state);
          ++state;
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
          // Where dQ leaves by per-thread vector reductions, its GEMM goes first so that the reductions are issued while
          // the dV and dK GEMMs run (d=256: +11-14 %). The SMEM hand-off (d=192) is short; dQ first measured 1-2 %
          // slower there (NOTES_bwd.md v9).
          constexpr bool kdQFirst = !Traits::kdQViaSmem;
          if constexpr (kdQFirst) issue_gemm<true>(mma_dq, tdQrdS(_, _, _, pds), tdQrKt, tdQrdQ);
          issue_gemm<false>(mma_dv, tdVrPt(_, _, _, pds), tdVrdOt(_, _, _, stage), tdVrdV);
          issue_gemm<false>(mma_dk, tdKrdSt(_, _, _, pds), tdKrQt(_, _, _, stage), tdKrdK);
          if constexpr (kdQFirst) {
            warpgroup_wait<2>();  // dQ
            warpgroup_fence_operand(tdQrdQ);
            add_dq(w, tdQrdQ, head, m_block);
            warpgroup_wait<0>();
            pipeline.consumer_release(state);
            ++state;
          } else {
            issue_gemm<true>(mma_dq, tdQrdS(_, _, _, pds), tdQrKt, tdQrdQ);
            warpgroup_wait<0>();
            pipeline.consumer_release(state);
            ++state;
            add_dq(w, tdQrdQ, head, m_block);
          }
        }
      }
    }

    // ---------------- epilogue: dK (scaled) and dV through SMEM ----------------
    // The accumulators are staged with stmatrix in the K / V buffers (free once both warpgroups' last GEMMs have
    // retired), then leave whole: by TMA store or as 16-byte row chunks (BwdDKVOut); rows past the sequence's keys
    // are dropped. Stores straight from the fragment positions (4 bytes per thread, half of each 32-byte sector) made the
    // main kernel ~3 us longer per CTA (NOTES_bwd.md v7: 675 -> 628 us at d=128 causal 2k, ~15.5 CTAs per SM).
    consumer_sync();
    auto stage = [&](auto& acc, auto const& mma, auto& smem_tile, float scale) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) acc(i) *= scale;
      Tensor converted = convert_fragment<Element>(acc);
      auto copy_out = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma);
      auto thr_copy_out = copy_out.get_thread_slice(tid);
      copy(copy_out, thr_copy_out.retile_S(converted),
           thr_copy_out.partition_D(as_position_independent_swizzle_tensor(smem_tile)));
    };
    Tensor sdK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutdKOut{});
    Tensor sdV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutdVOut{});
    stage(tdKrdK, mma_dk, sdK, args.softmax_scale);
    stage(tdVrdV, mma_dv, sdV, 1.f);
    // Packed keys take the row writes: see BwdDKVOut. Only they can be followed by another tile of the CTA (BwdTiles
    // walks packed keys), so only the row writes release kv_empty.
    if (Traits::kTmaStoreDKV && !(kVarlen && args.seqs.k.packed())) {
      if constexpr (Traits::kTmaStoreDKV) {
        cutlass::arch::fence_view_async_shared();  // generic-proxy SMEM writes, read next by the TMA (async proxy)
        consumer_sync();
        if (tid == 0) {
          auto store = [&](auto const& tma, auto const& shape, auto const& smem_tile, auto tile_shape) {
            Tensor g = local_tile(tma.get_tma_tensor(shape)(_, _, w.cta.kv_head, w.seq.k_batch), tile_shape,
                                  make_coord(w.cta.n_block, _0{}));
            auto [dst, src] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem_tile),
                                            group_modes<0, 2>(g));
            copy(tma, src, dst);
          };
          store(args.dkv_out.tma_dk, args.shape_k, sdK, Shape<BN, D>{});
          store(args.dkv_out.tma_dv, args.shape_v, sdV, Shape<BN, DV>{});
          tma_store_arrive();
          tma_store_wait<0>();  // the SMEM source must outlive the copies' reads
        }
      }
    } else {
      consumer_sync();
      auto write_rows = [&](auto const& smem_tile, Element* out, Strides const& st) {
        constexpr int kDim = decltype(size<1>(smem_tile))::value;
        constexpr int kChunksPerRow = kDim / 8;  // 16-byte chunks; the swizzle keeps each one contiguous
        Element* base = out + w.seq.k_batch * st.batch + int64_t(w.seq.k_offset) * st.row + w.cta.kv_head * st.head;
        for (int idx = tid; idx < kBlockN * kChunksPerRow; idx += Traits::kNumMmaThreads) {
          const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
          const int row = w.cta.n_block * kBlockN + r;
          if (row < w.seq.vis.seqlen_k) {
            *reinterpret_cast<uint4*>(base + row * st.row + c) = *reinterpret_cast<uint4 const*>(&smem_tile(r, c));
          }
        }
      };
      write_rows(sdK, args.dkv_out.dk, args.dkv_out.dk_strides);
      write_rows(sdV, args.dkv_out.dv, args.dkv_out.dv_strides);
      if constexpr (kVarlen) {  // a next tile may follow (BwdTiles)
        cutlass::arch::fence_view_async_shared();  // these generic reads before the next K / V's TMA writes
        consumer_sync();
        if (tid == 0) cutlass::arch::ClusterBarrier::arrive(&ss.kv_empty);
      }
    }
  });
}

}  // namespace bwd
}  // namespace fa3

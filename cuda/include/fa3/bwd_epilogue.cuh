// Backward epilogue: a tile's dK (scaled) and dV leave through SMEM (docs/kernels.md §3.9).
//
// The accumulators are staged with stmatrix in the K / V buffers (free once both warpgroups' last GEMMs have retired),
// then leave whole: by TMA store or as 16-byte row chunks (BwdDKVOut, bwd_traits.cuh); rows past the sequence's keys
// are dropped. Stores straight from the fragment positions (4 bytes per thread, half of each 32-byte sector) made the
// main kernel ~3 us longer per CTA (NOTES_bwd.md v7: 675 -> 628 us at d=128 causal 2k, ~15.5 CTAs per SM).
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"

#include "fa3/bwd_block_order.cuh"
#include "fa3/bwd_dq.cuh"
#include "fa3/bwd_traits.cuh"
#include "fa3/fragment.cuh"

namespace fa3 {
namespace bwd {

template <class Traits, bool kVarlen>
struct BwdEpilogue {
  using Element = typename Traits::Element;
  using Args = BwdArgs<Traits>;
  using Storage = typename Traits::SharedStorage;
  static constexpr int kBlockN = Traits::kBlockN;

  // Consumer threads (tid: 0..255), once per tile.
  template <class TdK, class TdV>
  CUTE_DEVICE static void store(Args const& args, Storage& ss, int tid, BwdTile const& w, TdK& tdKrdK,
                                TdV& tdVrdV) {
    using namespace cute;
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
    stage(tdKrdK, typename Traits::TiledMmadK{}, sdK, args.softmax_scale);
    stage(tdVrdV, typename Traits::TiledMmadV{}, sdV, 1.f);
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
          store(args.dkv_out.tma_dk, args.shape_k, sdK, Shape<typename Traits::BN, typename Traits::D>{});
          store(args.dkv_out.tma_dv, args.shape_v, sdV, Shape<typename Traits::BN, typename Traits::DV>{});
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
  }
};

}  // namespace bwd
}  // namespace fa3

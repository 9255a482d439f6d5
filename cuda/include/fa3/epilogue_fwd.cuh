// Forward epilogue: normalise O, stage it (16-bit) in SMEM (its own buffer with the persistent grid, else Q's), write
// it with coalesced 16-byte row-predicated stores (rows of the tile's sequence only), and write the LSE from the
// threads that own column 0 of each row.
// Each consumer warpgroup stores its own 64 rows, so with a separate O buffer the warpgroups never wait for each
// other here and one can start its next tile while the other is still storing.
//
// Not TMA-stored (docs/kernels.md §2.7) yet: predicated stores are simple and can never write past the sequence's rows.
//
// With split-KV (fa3/split_kv.h) a tile's O and LSE are one split's partials: float32, stored straight from the
// registers into the split's copy of out's layout (decode tiles have a few valid rows: staging would not pay).
#pragma once

#include "cute/tensor.hpp"

#include "fa3/fragment.cuh"
#include "fa3/fwd_traits.cuh"
#include "fa3/pipeline.cuh"
#include "fa3/sequences.h"
#include "fa3/softmax.cuh"
#include "fa3/split_kv.h"
#include "fa3/tile_scheduler.cuh"

namespace fa3 {

template <class Traits>
struct FwdEpilogue {
  using Element = typename Traits::Element;
  using Args = FwdArgs<Traits>;
  using Storage = typename Traits::SharedStorage;

  template <class FragO>
  CUTE_DEVICE static void store(Args const& args, Storage& smem, int thread_idx, FwdTileScheduler::Tile const& tile,
                                Sequence const& seq, FragO& tOrO, OnlineSoftmax<2>& softmax) {
    using namespace cute;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kHeadDimV = Traits::kHeadDimV;
    const int head = tile.head;
    float inv_sum[2], lse[2];
    softmax.finalize(inv_sum, lse);
    Tensor tOrO_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(tOrO_rc); ++c) tOrO_rc(r, c) *= inv_sum[r];
    }

    typename Traits::TiledMmaPV mma_pv;
    auto thr_pv = mma_pv.get_slice(thread_idx);
    Tensor cO = make_identity_tensor(Shape<typename Traits::BM, typename Traits::DV>{});
    Tensor tOcO = thr_pv.partition_C(cO);
    Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));

    const int row0 = tile.m_block * kBlockM;  // rows count from the sequence's first row, seq.q_offset
    const int seqlen_q = seq.vis.seqlen_q;
    const Strides& os = args.out_strides;
    const int64_t o_at = seq.q_batch * os.batch + int64_t(seq.q_offset) * os.row + head * os.head;
    const int64_t lse_at = seq.q_batch * args.lse_strides.batch + head * args.lse_strides.head + seq.q_offset;
    const SplitPartials& parts = args.splits;
    const bool partial = Traits::Tile::kSplitKV && parts.count > 1;
    float* lse_ptr = partial ? parts.lse + tile.split * parts.lse_split + lse_at : args.lse + lse_at;
    if (get<1>(tOcO_rc(0, 0)) == 0) {
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + get<0>(tOcO_rc(r, 0));
        if (row < seqlen_q) lse_ptr[row] = lse[r];
      }
    }
    if (partial) {
      float* o_ptr = parts.out + tile.split * parts.out_split + o_at;
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + get<0>(tOcO_rc(r, 0));
        if (row < seqlen_q) {
          CUTE_UNROLL
          for (int c = 0; c < size<1>(tOrO_rc); ++c) o_ptr[row * os.row + get<1>(tOcO_rc(r, c))] = tOrO_rc(r, c);
        }
      }
      return;
    }
    Tensor rO = convert_fragment<Element>(tOrO);

    // A warpgroup writes and reads only its own rows of sO (the P V atoms stack the warpgroups along M).
    const int wg = thread_idx / 128;
    if constexpr (Traits::kPersistent) {
      // The warpgroup's reads of the previous tile's O are done before its rows are overwritten.
      named_barrier_sync(128, FwdBarrier::kEpilogue0, wg);
    } else {
      // Q's SMEM becomes O's: every consumer warpgroup must be past its last Q K^T (with d != d_v the two layouts
      // do not keep warpgroups' rows apart).
      named_barrier_sync(Traits::kNumMmaThreads, FwdBarrier::kConsumers);
    }
    Tensor sO = make_tensor(make_smem_ptr(smem.qo.o_data()), typename Traits::SmemLayoutO{});
    Tensor tOsO = thr_pv.partition_C(sO);
    copy(rO, tOsO);
    named_barrier_sync(128, FwdBarrier::kEpilogue0, wg);

    constexpr int kRowsPerWarpGroup = kBlockM / Traits::kNumMmaWarpGroups;
    constexpr int kChunksPerRow = kHeadDimV / 8;  // 16-byte chunks
    Element* o_ptr = args.out + o_at;
    for (int idx = thread_idx % 128; idx < kRowsPerWarpGroup * kChunksPerRow; idx += 128) {
      const int r = wg * kRowsPerWarpGroup + idx / kChunksPerRow;
      const int c = (idx % kChunksPerRow) * 8;
      const int row = row0 + r;
      if (row < seqlen_q) {
        *reinterpret_cast<uint4*>(o_ptr + row * os.row + c) = *reinterpret_cast<uint4 const*>(&sO(r, c));
      }
    }
  }
};

}  // namespace fa3

// Compile-time configuration of one forward instantiation: SMEM layouts, tiled WGMMAs, TMA types, SMEM storage.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cute/atom/mma_atom.hpp"
#include "cute/atom/copy_traits_sm90_tma.hpp"
#include "cutlass/gemm/collective/builders/sm90_common.inl"
#include "cutlass/numeric_types.h"

#include "fa3/params.h"
#include "fa3/pipeline.cuh"
#include "fa3/sequences.h"
#include "fa3/split_kv.h"
#include "fa3/tile_scheduler.cuh"
#include "fa3/tile_size.h"
#include "fa3/uncovered_rows.cuh"

namespace fa3 {

template <class Element_, int kHeadDim_, int kHeadDimV_, int kBlockM_ = 128>
struct FwdTraits {
  using Element = Element_;
  using Tile = FwdTileSize<kHeadDim_, kHeadDimV_, kBlockM_>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kBlockM = Tile::kBlockM;
  static constexpr int kBlockN = Tile::kBlockN;
  static constexpr int kStages = Tile::kStages;
  static constexpr int kNumMmaWarpGroups = Tile::kNumMmaWarpGroups;
  static constexpr int kNumMmaThreads = 128 * kNumMmaWarpGroups;
  static constexpr int kNumThreads = Tile::kNumThreads;

  using BM = cute::Int<kBlockM>;
  using BN = cute::Int<kBlockN>;
  using D = cute::Int<kHeadDim>;
  using DV = cute::Int<kHeadDimV>;

  // One 64-row WGMMA atom per consumer warpgroup, stacked along M.
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kNumMmaWarpGroups>, cute::_1, cute::_1>>;
  // S = Q K^T: both operands K-major in SMEM (SS).
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, BN, D>>(), AtomLayout{}));
  // O += P V: P from registers (RS); V is row-major (d contiguous), i.e. MN-major as the B operand.
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, DV, BN>, cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemAtomQ = decltype(cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, BM, D>());
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtomQ{}, cute::Shape<BM, D>{}));
  using SmemAtomK = decltype(cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, BN, D>());
  using SmemLayoutK = decltype(cute::tile_to_shape(SmemAtomK{}, cute::Shape<BN, D, cute::Int<kStages>>{}));
  using SmemAtomV = decltype(cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, BN, DV>());
  using SmemLayoutV = decltype(cute::tile_to_shape(SmemAtomV{}, cute::Shape<BN, DV, cute::Int<kStages>>{}));
  // V viewed as (d_v, kBlockN, stages): the same bytes, transposed, for the B operand of P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{}, cute::make_ordered_layout(cute::Shape<DV, BN, cute::Int<kStages>>{}, cute::Step<cute::_2, cute::_1, cute::_3>{})));
  // O is staged in SMEM for the epilogue: its own buffer with the persistent grid, Q's buffer otherwise.
  using SmemAtomO = decltype(cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, BM, DV>());
  using SmemLayoutO = decltype(cute::tile_to_shape(SmemAtomO{}, cute::Shape<BM, DV>{}));

  // Global tensors as (rows, d, head, batch) with runtime extents; TMA zero-fills rows past the tensor's end.
  using ShapeQKV = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideQKV = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using GmemQKV = decltype(cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{},
                                             StrideQKV{}));
  using TmaQ = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GmemQKV{}, SmemLayoutQ{}, cute::Shape<BM, D>{},
                                            cute::_1{}));
  using TmaK = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GmemQKV{},
                                            cute::take<0, 2>(SmemLayoutK{}), cute::Shape<BN, D>{}, cute::_1{}));
  using TmaV = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GmemQKV{},
                                            cute::take<0, 2>(SmemLayoutV{}), cute::Shape<BN, DV>{}, cute::_1{}));

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesV = kBlockN * kHeadDimV * sizeof(Element);

  static constexpr bool kPersistent = Tile::kPersistent;
  static constexpr int kSizeQ = cute::cosize_v<SmemLayoutQ>;
  static constexpr int kSizeO = cute::cosize_v<SmemLayoutO>;

  // Q and O buffers. 1024-byte alignment: the 128-byte swizzle pattern repeats every 1024 bytes and TMA/WGMMA
  // assume it starts there.
  struct SeparateQO {
    alignas(1024) cute::array_aligned<Element, kSizeQ, 1024> q;
    alignas(1024) cute::array_aligned<Element, kSizeO, 1024> o;
    CUTE_DEVICE Element* q_data() { return q.data(); }
    CUTE_DEVICE Element* o_data() { return o.data(); }
  };
  struct SharedQO {
    alignas(1024) cute::array_aligned<Element, (kSizeQ > kSizeO ? kSizeQ : kSizeO), 1024> qo;
    CUTE_DEVICE Element* q_data() { return qo.data(); }
    CUTE_DEVICE Element* o_data() { return qo.data(); }
  };

  struct SharedStorage {
    cute::conditional_t<kPersistent, SeparateQO, SharedQO> qo;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>, 1024> v;
    alignas(16) uint64_t bar_q;  // Q landed (transaction barrier, one phase per tile)
    uint64_t bar_q_empty;        // consumers are done reading Q: the producer may load the next tile's
    TmaPipeline<kStages> pipe_k;
    TmaPipeline<kStages> pipe_v;
    TileRing tiles;  // the dynamic walk's tiles (persistent grid, kVarlen; fa3/tile_scheduler.cuh)
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "forward tile does not fit in SMEM");
};

// Kernel arguments (passed as a __grid_constant__ parameter: the TMA descriptors must live in param/const space).
template <class Traits>
struct FwdArgs {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaK tma_k;
  typename Traits::TmaV tma_v;
  typename Traits::ShapeQKV shape_q, shape_k, shape_v;  // (rows, d, heads, batch entries); packed: one entry
  typename Traits::Element* out;
  Strides out_strides;
  float* lse;
  Strides lse_strides;
  Sequences seqs;  // each sequence's rows, lengths and mask (seqs.at<kVarlen>(b))
  int heads, batch, head_group;  // head_group = heads / kv_heads
  FwdTileScheduler scheduler;
  float scale_log2;               // exp2-domain score scale: scale*log2e, or softcap*log2e with softcap
  float softcap_pre;              // scale / softcap (softcap on), unused otherwise
  bool has_softcap;
  UncoveredRows uncovered;        // kVarlen: the query rows no sequence covers, cleared by the spare producer warps
  SplitPartials splits;           // split-KV (fa3/split_kv.h): with count > 1 the tiles write these, not out / lse
};

}  // namespace fa3

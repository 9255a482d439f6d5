// Backward tile configuration: tile sizes, SMEM layouts and the five tiled WGMMAs (docs/kernels.md §3.4, §3.11).
//
// Two forms (docs/kernels.md §3.4):
//  - RS (d <= 128, 128 key rows): the consumers compute S^T = K Q^T and dP^T = V dO^T, each warpgroup owning 64
//    keys, so P^T and dS^T are register-A operands of dV += P^T dO and dK += dS^T Q; only dS goes through SMEM
//    (for dQ = dS K, which needs both warpgroups' keys). Less SMEM operand traffic per FLOP, no P buffer, and the
//    cross-warpgroup barrier only guards dQ.
//  - SS (d = 192, 256: no register room for RS dK/dV next to the larger accumulators): P and dS go through SMEM once
//    per iteration and feed dV, dK and dQ.
// Two consumer warpgroups split each GEMM along M or N. A warpgroup's slice of an MN-major operand must start on a
// swizzle-atom boundary (its WGMMA descriptor cannot start inside an atom), so each tensor's swizzle width is the
// largest of 64/32/16 elements that divides every MN-major slice taken of it (NOTES_bwd.md, "swizzle widths").
#pragma once

#include "cute/tensor.hpp"
#include "cute/atom/mma_traits_sm90_gmma.hpp"
#include "cute/atom/copy_traits_sm90_tma.hpp"

#include "fa3/bwd_launch.h"
#include "fa3/pipeline.cuh"
#include "fa3/visibility.h"

namespace fa3 {
namespace bwd {

using namespace cute;

template <int kWidth, class Element>
struct SmemAtomK;
template <class Element>
struct SmemAtomK<64, Element> { using type = GMMA::Layout_K_SW128_Atom<Element>; };
template <class Element>
struct SmemAtomK<32, Element> { using type = GMMA::Layout_K_SW64_Atom<Element>; };
template <class Element>
struct SmemAtomK<16, Element> { using type = GMMA::Layout_K_SW32_Atom<Element>; };

// Largest swizzle width (elements of 16 bits) dividing every extent given.
constexpr int swizzle_width(int a, int b) {
  return (a % 64 == 0 && b % 64 == 0) ? 64 : ((a % 32 == 0 && b % 32 == 0) ? 32 : 16);
}

template <class Element_, int kHeadDim_, int kHeadDimV_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static_assert(kHeadDim % 32 == 0 && kHeadDimV % 32 == 0 && kHeadDim <= 256 && kHeadDimV <= 256);
  static constexpr int kBlockM = bwd_block_m(kHeadDim);
  static constexpr int kBlockN = bwd_block_n(kHeadDim);
  static constexpr int kNumMmaThreads = 256;  // 2 consumer warpgroups
  static constexpr int kNumThreads = 384;     // + 1 producer warpgroup
  // setmaxnreg moves registers within the CTA's launch allocation (384 x 168 = 64512 under __launch_bounds__(384, 1)),
  // not the whole 64K file: 128*24 + 256*240 = 64512 exactly. (32/240 would need 65536: the consumers' setmaxnreg.inc
  // then waits forever, which is how a first version hung.)
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static constexpr int kStages = 2;  // Q / dO pipeline depth
  // P/dS double-buffered, so that writing iteration it's tiles needs no barrier beyond the previous iteration's
  // (bwd_kernel.cuh). d=256 fits with under 1 KB of SMEM to spare; there it measured +2.5-5 % over one buffer
  // (NOTES_bwd.md v9).
  static constexpr int kStagesPdS = 2;

  using BM = Int<kBlockM>;
  using BN = Int<kBlockN>;
  using D = Int<kHeadDim>;
  using DV = Int<kHeadDimV>;

  static constexpr bool kRS = kBlockN == 128 && kHeadDim <= 128 && kHeadDimV <= 128;
  // 128-row M-blocks would make S^T / dP^T m64 n128 per warpgroup: 344 B of spills at d=64 (NOTES_bwd.md v5).
  static_assert(!kRS || kBlockM == 64, "the RS form is built for 64-row M-blocks");

  // Warpgroup split per GEMM: along M when the GEMM has 128 rows, else along N.
  static constexpr bool kSdPAlongM = kBlockM == 128;
  static constexpr bool kdKVAlongM = kBlockN == 128;
  static constexpr bool kdQAlongM = kBlockM == 128;
  static constexpr int kSdPN = kSdPAlongM ? kBlockN : kBlockN / 2;      // per-warpgroup N of S / dP
  static constexpr int kdKN = kdKVAlongM ? kHeadDim : kHeadDim / 2;     // per-warpgroup N of dK
  static constexpr int kdVN = kdKVAlongM ? kHeadDimV : kHeadDimV / 2;   // per-warpgroup N of dV
  static constexpr int kdQN = kdQAlongM ? kHeadDim : kHeadDim / 2;      // per-warpgroup N of dQ
  using AtomLayoutSdP = std::conditional_t<kSdPAlongM, Layout<Shape<_2, _1, _1>>, Layout<Shape<_1, _2, _1>>>;
  using AtomLayoutdKV = std::conditional_t<kdKVAlongM, Layout<Shape<_2, _1, _1>>, Layout<Shape<_1, _2, _1>>>;
  using AtomLayoutdQ = std::conditional_t<kdQAlongM, Layout<Shape<_2, _1, _1>>, Layout<Shape<_1, _2, _1>>>;

  // SS: S = Q K^T and dP = dO V^T, (kBlockM x kBlockN). RS: S^T = K Q^T and dP^T = V dO^T, (kBlockN x kBlockM),
  // one 64-key slice per warpgroup. Both operands K-major either way.
  using TiledMmaSdP = std::conditional_t<
      kRS,
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, BM, _16>>(),
                              Layout<Shape<_2, _1, _1>>{})),
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSdPN>, _16>>(),
                              AtomLayoutSdP{}))>;
  using ShapeSdP = std::conditional_t<kRS, Shape<BN, BM>, Shape<BM, BN>>;  // the S / dP accumulator tile
  // dV += P^T dO and dK += dS^T Q: (kBlockN x d). B is a transposed (MN-major) view of dO / Q; A is the converted
  // S^T / dP^T accumulator (RS) or a transposed view of the P / dS buffer (SS).
  template <int kN>
  using TiledMmaGrad = std::conditional_t<
      kRS,
      decltype(make_tiled_mma(
          GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kN>, _16>, GMMA::Major::K, GMMA::Major::MN>(),
          AtomLayoutdKV{})),
      decltype(make_tiled_mma(
          GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kN>, _16>, GMMA::Major::MN, GMMA::Major::MN>(),
          AtomLayoutdKV{}))>;
  using TiledMmadV = TiledMmaGrad<kdVN>;
  using TiledMmadK = TiledMmaGrad<kdKN>;
  // dQ = dS K: (kBlockM x d), A K-major, B = K^T view (MN-major).
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kdQN>, _16>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayoutdQ{}));

  // Swizzle widths: Q^T is sliced by dK's N, K^T by dQ's N, dO^T by dV's N; V is only read K-major.
  static constexpr int kSwQ = swizzle_width(kHeadDim, kdKN);
  static constexpr int kSwK = swizzle_width(kHeadDim, kdQN);
  static constexpr int kSwdO = swizzle_width(kHeadDimV, kdVN);
  static constexpr int kSwV = swizzle_width(kHeadDimV, kHeadDimV);

  using SmemLayoutQ = decltype(tile_to_shape(typename SmemAtomK<kSwQ, Element>::type{},
                                             Shape<BM, D, Int<kStages>>{}));
  using SmemLayoutdO = decltype(tile_to_shape(typename SmemAtomK<kSwdO, Element>::type{},
                                              Shape<BM, DV, Int<kStages>>{}));
  using SmemLayoutK = decltype(tile_to_shape(typename SmemAtomK<kSwK, Element>::type{}, Shape<BN, D>{}));
  using SmemLayoutV = decltype(tile_to_shape(typename SmemAtomK<kSwV, Element>::type{}, Shape<BN, DV>{}));
  // The epilogue stages dK / dV in the K / V buffers through these views: their swizzle width divides the warpgroup's
  // dK / dV N slice, which the load layouts' width need not (d=192: V is 64-wide, the dV slice 96 columns).
  using SmemLayoutdKOut = decltype(tile_to_shape(
      typename SmemAtomK<swizzle_width(kHeadDim, kdKN), Element>::type{}, Shape<BN, D>{}));
  using SmemLayoutdVOut = decltype(tile_to_shape(
      typename SmemAtomK<swizzle_width(kHeadDimV, kdVN), Element>::type{}, Shape<BN, DV>{}));
  // P and dS: (kBlockM x kBlockN), kBlockN contiguous; kBlockN is 64 or 128 so SW128 always fits.
  using SmemLayoutPdS = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                               Shape<BM, BN, Int<kStagesPdS>>{}));
  // Transposed views of the same bytes.
  using SmemLayoutQt = decltype(composition(SmemLayoutQ{},
      make_ordered_layout(Shape<D, BM, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutdOt = decltype(composition(SmemLayoutdO{},
      make_ordered_layout(Shape<DV, BM, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutKt = decltype(composition(SmemLayoutK{}, make_ordered_layout(Shape<D, BN>{}, Step<_2, _1>{})));
  using SmemLayoutPdSt = decltype(composition(SmemLayoutPdS{},
      make_ordered_layout(Shape<BN, BM, Int<kStagesPdS>>{}, Step<_2, _1, _3>{})));

  // dQ partial staged in SMEM and added by the writer warp with one bulk reduce-add per warpgroup (bwd_dq.cuh) where
  // that was measured faster than per-thread reductions: d=96 (+2-10 % with the writer warp; -3 % when the consumers
  // issued the adds themselves), d=128 (+7-10 %), d=192 (+15-20 %: 12 vector reductions per thread otherwise). At
  // d=64 both ways measure the same (within 1 %) with the writer, and reductions need no handoff. d=256 has no SMEM
  // room for the fp32 tile.
  static constexpr bool kdQViaSmem = kHeadDim == 96 || kHeadDim == 128 || kHeadDim == 192;
  struct NoSmem {};
  using SmemdQ = std::conditional_t<kdQViaSmem, cute::array_aligned<float, kBlockM * kHeadDim, 128>, NoSmem>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdO>, 1024> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    alignas(1024) std::conditional_t<kRS, NoSmem, cute::array_aligned<Element, cosize_v<SmemLayoutPdS>, 1024>> p;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutPdS>, 1024> ds;
    alignas(128) SmemdQ dq;
    // lse * log2e and D of the M-block's rows, loaded with Q / dO into the same pipeline stage.
    alignas(128) float lse[kStages][kBlockM];
    alignas(128) float dsum[kStages][kBlockM];
    // Q, dO, lse, D (bwd_mainloop.cuh); lse / D are also read by plain loads, so every thread releases.
    TmaPipeline<kStages, ReleaseBy::kThread> pipe;
    alignas(16) uint64_t kv_barrier;  // K and V of the CTA's current tile have landed
    uint64_t kv_empty;                // the last tile's epilogue is done with the K / V buffers
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;  // + manual 1024-byte alignment
  static_assert(kSmemBytes <= 232448, "backward tile exceeds 227 KB of SMEM");

  // Global tensors as TMA sees them: (rows, d, heads, batch entries); a packed side is one batch entry.
  using ShapeQKV = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideQKV = cute::Stride<int64_t, _1, int64_t, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{},
                                          StrideQKV{}));
  using TMA_Q = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}), Shape<BM, D>{}, _1{}));
  using TMA_dO = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutdO{}), Shape<BM, DV>{},
                                        _1{}));
  using TMA_K = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutK{}, Shape<BN, D>{}, _1{}));
  using TMA_V = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutV{}, Shape<BN, DV>{}, _1{}));
  // dK / dV leave their SMEM staging buffers (bwd_kernel.cuh epilogue) through TMA stores issued by one thread, which
  // drop rows past seqlen_k (the tensor's extent), or as 16-byte row writes from every consumer thread. The TMA stores
  // measured 2-3 % faster at d=64 and d=256, 0.3-4 % slower at d=128 (H100, benchmarks/NOTES_bwd.md v8).
  static constexpr bool kTmaStoreDKV = kHeadDim != 128;
  using GmemTensorOut = decltype(make_tensor(make_gmem_ptr(static_cast<Element*>(nullptr)), ShapeQKV{}, StrideQKV{}));
  using TMA_dK = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensorOut{}, SmemLayoutdKOut{}, Shape<BN, D>{}, _1{}));
  using TMA_dV = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensorOut{}, SmemLayoutdVOut{}, Shape<BN, DV>{}, _1{}));
  static constexpr uint32_t kRowStatBytes = uint32_t(kBlockM) * sizeof(float);
  // Bytes landing on one Q / dO pipeline stage's barrier: Q, dO and the rows' lse / D.
  static constexpr uint32_t kTmaBytesPerStage =
      uint32_t(kBlockM) * (kHeadDim + kHeadDimV) * sizeof(Element) + 2 * kRowStatBytes;
  static constexpr uint32_t kTmaBytesKV = uint32_t(kBlockN) * (kHeadDim + kHeadDimV) * sizeof(Element);
  // dQ partial per thread (fragment order in the workspace, float4 granules).
  static constexpr int kdQPerThread = kBlockM * kHeadDim / kNumMmaThreads;
  static_assert(kdQPerThread % 4 == 0);
};

// Where dK / dV go: 16-byte row writes through the pointers, or TMA stores (Traits::kTmaStoreDKV) where the keys are
// BSHD. Packed keys always take the row writes: a TMA store of a whole key block would write into the next
// sequence's rows, which another CTA owns.
template <class Traits>
struct BwdDKVRows {
  typename Traits::Element* dk;
  typename Traits::Element* dv;
  Strides dk_strides, dv_strides;
};
template <class Traits, bool kTma = Traits::kTmaStoreDKV>
struct BwdDKVOut : BwdDKVRows<Traits> {
  typename Traits::TMA_dK tma_dk;
  typename Traits::TMA_dV tma_dv;
};
template <class Traits>
struct BwdDKVOut<Traits, false> : BwdDKVRows<Traits> {};

// Kernel arguments (built once on the host by run_bwd).
template <class Traits>
struct BwdArgs {
  typename Traits::TMA_Q tma_q;
  typename Traits::TMA_dO tma_do;
  typename Traits::TMA_K tma_k;
  typename Traits::TMA_V tma_v;
  typename Traits::ShapeQKV shape_q, shape_do, shape_k, shape_v;
  BwdDKVOut<Traits> dkv_out;
  const float* lse_log2;  // workspace
  const float* dsum;      // workspace
  float* dq_accum;        // workspace
  int* dq_sem;            // workspace (deterministic only)
  BwdRows ws_rows;        // where each (sequence, head) has its rows in the sections above
  Sequences seqs;         // each sequence's rows, lengths and mask (seqs.at<kVarlen>(b))
  int heads, kv_heads, batch, group;
  int num_m_blocks, num_n_blocks;  // of the longest sequences
  int key_row_blocks;     // packed keys: blocks of kBlockN rows of the key tensor (bwd_block_order.cuh)
  bool walk_key_blocks;   // the grid is over key_row_blocks (else over the longest sequence's key blocks)
  float scale_log2;       // softmax_scale * log2e (no softcap) or softcap * log2e (softcap)
  float softcap_pre;      // softmax_scale / softcap
  float softmax_scale;
  bool has_softcap;
  bool deterministic;
  int pairs_per_group;    // CTA order (bwd_block_order.cuh)
};

}  // namespace bwd
}  // namespace fa3

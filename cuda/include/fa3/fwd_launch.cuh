// Host side of the forward kernel: TMA descriptors, kernel arguments, tile schedule, one-time per-device setup
// (SMEM opt-in, SM count), the clearing of rows no sequence covers, launch, and with split-KV the combine.
#pragma once

#include <cmath>

#include "cute/tensor.hpp"

#include "fa3/fwd_kernel.cuh"
#include "fa3/fwd_launch.h"
#include "fa3/fwd_traits.cuh"
#include "fa3/launch_setup.h"
#include "fa3/sequences.h"
#include "fa3/split_kv.h"
#include "fa3/split_kv_combine.cuh"
#include "fa3/uncovered_rows.cuh"
#include "fa3/visibility.h"

namespace fa3 {

template <class Traits, bool kVarlen>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using namespace cute;
  using Element = typename Traits::Element;
  using Args = FwdArgs<Traits>;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kHeadDimV = Traits::kHeadDimV;
  const Sequences seqs = p.sequences();

  // (rows, d, heads, batch entries): a packed side is one batch entry of all its rows.
  auto make_gmem = [&](const void* ptr, SeqSide const& side, int d, int heads, Strides const& st) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)),
                       typename Traits::ShapeQKV{side.rows, d, heads, side.packed() ? 1 : p.batch},
                       typename Traits::StrideQKV{st.row, _1{}, st.head, st.batch});
  };
  auto mQ = make_gmem(p.q, p.seq_q, kHeadDim, p.heads, p.q_strides);
  auto mK = make_gmem(p.k, p.seq_k, kHeadDim, p.kv_heads, p.k_strides);
  auto mV = make_gmem(p.v, p.seq_k, kHeadDimV, p.kv_heads, p.v_strides);

  const int num_m_blocks = (p.seq_q.len + Traits::kBlockM - 1) / Traits::kBlockM;
  const int splits = p.num_splits;
  // Split-KV's partials and combine cover the rows of BSHD queries, all of which tiles compute (fa3/split_kv.h).
  if (splits < 1 || splits > kMaxSplits || (splits > 1 && (!p.seq_q.uniform() || !Traits::Tile::kSplitKV)))
    return cudaErrorInvalidValue;
  if ((long long)num_m_blocks * p.heads * splits * p.batch > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  constexpr int kSmem = Traits::kSmemBytes;
  const LaunchSetup& setup = launch_setup<fwd_kernel<Traits, kVarlen>>(kSmem, p.device);
  if (setup.err != cudaSuccess) return setup.err;
  // Pair long with short m-blocks only where the tile costs (visible key blocks) differ along the sequence, judged
  // by the longest sequence's rule. (The non-persistent varlen grid runs over the longest sequence's m-blocks and
  // ignores the pairing; the persistent one pairs within each sequence.)
  const Visibility bound = seqs.bound();
  auto key_blocks = [&](int m_block) {
    const BlockRange r = bound.key_blocks(m_block, Traits::kBlockM, Traits::kBlockN);
    return imax(0, r.n_max - r.n_min);
  };
  // Persistent: one CTA per SM (the SMEM footprint allows only one), each walking its strided share of the work.
  FwdTileScheduler sched =
      FwdTileScheduler::make(num_m_blocks, p.heads, splits, p.batch, key_blocks(0) != key_blocks(num_m_blocks - 1),
                             Traits::kPersistent, setup.num_sms);
  const int64_t rows_q = int64_t(p.batch) * p.seq_q.rows;
  const int64_t ws_needed = FwdWorkspace::bytes(Traits::kPersistent && kVarlen, splits, rows_q, p.heads, kHeadDimV);
  if (p.workspace_bytes < ws_needed) return cudaErrorInvalidValue;
  if constexpr (Traits::kPersistent && kVarlen) {  // the dynamic walk's counter
    sched.counter = FwdWorkspace::counter(p.workspace);
    if (cudaError_t err = cudaMemsetAsync(sched.counter, 0, sizeof(int), stream); err != cudaSuccess) return err;
  }
  constexpr float kLog2e = 1.4426950408889634f;
  const bool has_softcap = p.softcap > 0.f;

  Args args;
  args.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Traits::SmemLayoutQ{},
                             Shape<typename Traits::BM, typename Traits::D>{}, _1{});
  args.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                             Shape<typename Traits::BN, typename Traits::D>{}, _1{});
  args.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mV, take<0, 2>(typename Traits::SmemLayoutV{}),
                             Shape<typename Traits::BN, typename Traits::DV>{}, _1{});
  args.shape_q = mQ.shape();
  args.shape_k = mK.shape();
  args.shape_v = mV.shape();
  args.out = static_cast<Element*>(p.out);
  args.out_strides = p.out_strides;
  args.lse = p.lse;
  args.lse_strides = p.lse_strides;
  args.seqs = seqs;
  args.heads = p.heads;
  args.batch = p.batch;
  args.head_group = p.heads / p.kv_heads;
  args.scheduler = sched;
  args.scale_log2 = has_softcap ? p.softcap * kLog2e : p.softmax_scale * kLog2e;
  args.softcap_pre = has_softcap ? p.softmax_scale / p.softcap : 0.f;
  args.has_softcap = has_softcap;

  args.uncovered.side = p.seq_q;
  args.uncovered.batch = p.batch;
  args.uncovered.heads = p.heads;
  args.uncovered.tensors[0] = UncoveredRows::Tensor{p.out, p.out_strides, kHeadDimV};
  args.uncovered.stat = p.lse;
  args.uncovered.stat_strides = p.lse_strides;
  args.splits = FwdWorkspace::partials(p.workspace, splits, rows_q, p.heads, kHeadDimV);

  fwd_kernel<Traits, kVarlen><<<dim3(unsigned(sched.ctas)), dim3(Traits::kNumThreads), kSmem, stream>>>(args);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess || splits == 1) return err;
  CombineArgs combine{args.splits, p.out, p.lse, p.out_strides, p.lse_strides, p.batch, p.seq_q.len, p.heads,
                      kHeadDimV};
  return launch_split_kv_combine<Element>(combine, setup.num_sms, stream);
}

// Whether a head-dim-64 call takes the 192-row tile: only when the rows see long key ranges, where its higher GEMM
// share pays for the longer prologue and epilogue per tile (NOTES_fwd.md v6b, H100: 192 rows won from 4k tokens up,
// causal 4k at parity, and lost 16-22 % at causal 1k-2k; v7, H200, with the round-robin pingpong: +2 % at non-causal
// 2k, -0.5..+4 % from 4k up, -14 % at causal 2k). The middle query row's visible key count stands for the mask's span:
// seqlen_k without a window, about seqlen_k / 2 causal, the window's width for local attention.
inline bool fwd_tall_tile_pays(const Visibility& vis) {
  const int row = vis.seqlen_q / 2;
  return vis.seqlen_q >= 2048 && vis.last_key(row) - imax(vis.first_key(row), 0) + 1 >= 2048;
}

template <class Element, int kHeadDim, int kHeadDimV>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.head_dim != kHeadDim || p.head_dim_v != kHeadDimV || !valid_problem(p)) return cudaErrorInvalidValue;
  using Traits = FwdTraits<Element, kHeadDim, kHeadDimV>;
  const Sequences seqs = p.sequences();
  // Sequences of unknown lengths take the 128-row tile: the tall one pays only on long ones.
  if (!seqs.uniform()) return launch_fwd<Traits, true>(p, stream);
  if constexpr (kHeadDim == 64 && kHeadDimV == 64) {
    if (p.num_splits == 1 && fwd_tall_tile_pays(seqs.bound())) return launch_fwd<FwdTraits<Element, 64, 64, 192>, false>(p, stream);
  }
  return launch_fwd<Traits, false>(p, stream);
}

}  // namespace fa3

// Host side of the backward: workspace carve-up, zeroing, TMA descriptors, one-time SMEM opt-in, the clearing of
// rows no sequence covers, three launches (preprocess, main, postprocess) on the caller's stream. No allocation, no
// synchronisation.
#pragma once

#include <cmath>

#include "cute/tensor.hpp"

#include "fa3/bwd_block_order.cuh"
#include "fa3/bwd_kernel.cuh"
#include "fa3/bwd_launch.h"
#include "fa3/bwd_postprocess.cuh"
#include "fa3/bwd_preprocess.cuh"
#include "fa3/bwd_traits.cuh"
#include "fa3/launch_setup.h"
#include "fa3/sequences.h"
#include "fa3/uncovered_rows.cuh"
#include "fa3/visibility.h"

namespace fa3 {

template <class Element, int kHeadDim, int kHeadDimV>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  using namespace cute;
  using Traits = bwd::BwdTraits<Element, kHeadDim, kHeadDimV>;
  using Args = bwd::BwdArgs<Traits>;
  if (p.head_dim != kHeadDim || p.head_dim_v != kHeadDimV || !valid_problem(p)) return cudaErrorInvalidValue;
  const Sequences seqs = p.sequences();
  const int64_t total_q = p.seq_q.packed() ? p.seq_q.rows : 0;
  const BwdWorkspaceLayout ws = bwd_workspace_layout(p.batch, p.seq_q.len, total_q, p.heads, kHeadDim,
                                                     p.deterministic);
  const BwdRows ws_rows = BwdRows::make(p.batch, p.seq_q.len, total_q, p.heads);
  static_assert(BwdRows::kBlockM == Traits::kBlockM);
  if (p.workspace == nullptr || p.workspace_bytes < ws.total) return cudaErrorInvalidValue;
  char* wbase = static_cast<char*>(p.workspace);
  const int num_m = (p.seq_q.len + Traits::kBlockM - 1) / Traits::kBlockM;
  const int num_n = (p.seq_k.len + Traits::kBlockN - 1) / Traits::kBlockN;

  cudaError_t err = cudaSuccess;
  if (ws.zero_bytes > 0) {  // the deterministic mode's semaphores; the preprocess zeroes the dQ accumulator
    err = cudaMemsetAsync(wbase, 0, size_t(ws.zero_bytes), stream);
    if (err != cudaSuccess) return err;
  }
  // Rows no sequence covers get zero gradients (before the kernels that write the covered ones).
  UncoveredRows uncovered_q;
  uncovered_q.side = p.seq_q;
  uncovered_q.batch = p.batch;
  uncovered_q.heads = p.heads;
  uncovered_q.tensors[0] = UncoveredRows::Tensor{p.dq, p.dq_strides, kHeadDim};
  UncoveredRows uncovered_k;
  uncovered_k.side = p.seq_k;
  uncovered_k.batch = p.batch;
  uncovered_k.heads = p.kv_heads;
  uncovered_k.tensors[0] = UncoveredRows::Tensor{p.dk, p.dk_strides, kHeadDim};
  uncovered_k.tensors[1] = UncoveredRows::Tensor{p.dv, p.dv_strides, kHeadDimV};
  if ((err = clear_uncovered_rows(uncovered_q, stream)) != cudaSuccess) return err;
  if ((err = clear_uncovered_rows(uncovered_k, stream)) != cudaSuccess) return err;

  {
    bwd::BwdPreprocessArgs<Element> pre;
    pre.dout = static_cast<const Element*>(p.dout);
    pre.out = static_cast<const Element*>(p.out);
    pre.dout_strides = p.dout_strides;
    pre.out_strides = p.out_strides;
    pre.lse = p.lse;
    pre.dlse = p.dlse;
    pre.lse_strides = p.lse_strides;
    pre.lse_log2 = reinterpret_cast<float*>(wbase + ws.lse);
    pre.dsum = reinterpret_cast<float*>(wbase + ws.dsum);
    pre.dq_accum = reinterpret_cast<float*>(wbase + ws.dq);
    pre.ws_rows = ws_rows;
    pre.seq_q = p.seq_q;
    pre.batch = p.batch;
    pre.heads = p.heads;
    pre.seq_rows = num_m * Traits::kBlockM;
    const long long blocks = bwd::bwd_preprocess_blocks(p.seq_q, p.batch, p.heads, pre.seq_rows);
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    bwd::bwd_preprocess_kernel<Element, kHeadDim, kHeadDimV><<<unsigned(blocks), 256, 0, stream>>>(pre);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  // (rows, d, heads, batch entries): a packed side is one batch entry of all its rows.
  auto layout = [&](SeqSide const& side, int d, int heads, Strides const& st) {
    return make_layout(typename Traits::ShapeQKV{side.rows, d, heads, side.packed() ? 1 : p.batch},
                       typename Traits::StrideQKV{st.row, _1{}, st.head, st.batch});
  };
  auto make_gmem = [&](const void* ptr, SeqSide const& side, int d, int heads, Strides const& st) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), layout(side, d, heads, st));
  };
  auto mQ = make_gmem(p.q, p.seq_q, kHeadDim, p.heads, p.q_strides);
  auto mdO = make_gmem(p.dout, p.seq_q, kHeadDimV, p.heads, p.dout_strides);
  auto mK = make_gmem(p.k, p.seq_k, kHeadDim, p.kv_heads, p.k_strides);
  auto mV = make_gmem(p.v, p.seq_k, kHeadDimV, p.kv_heads, p.v_strides);

  constexpr float kLog2e = 1.4426950408889634f;
  const bool has_softcap = p.softcap > 0.f;

  constexpr int kSmem = Traits::kSmemBytes;
  const bool varlen = !seqs.uniform();
  const LaunchSetup& setup = varlen ? launch_setup<bwd::bwd_kernel<Traits, true>>(kSmem, p.device)
                                    : launch_setup<bwd::bwd_kernel<Traits, false>>(kSmem, p.device);
  if (setup.err != cudaSuccess) return setup.err;
  // Sequences of different lengths cost differently, as masked ones do.
  const bool masked = varlen || !seqs.bound().unbounded();
  const int pairs_per_group =  // CTA order
      bwd::bwd_pairs_per_group(num_n, p.kv_heads * p.batch, masked, p.deterministic, setup.num_sms);

  bwd::BwdDKVOut<Traits> dkv_out;
  dkv_out.dk = static_cast<Element*>(p.dk);
  dkv_out.dv = static_cast<Element*>(p.dv);
  dkv_out.dk_strides = p.dk_strides;
  dkv_out.dv_strides = p.dv_strides;
  if constexpr (Traits::kTmaStoreDKV) {
    auto out = [&](void* ptr, int d, Strides const& st) {
      return make_tensor(make_gmem_ptr(static_cast<Element*>(ptr)), layout(p.seq_k, d, p.kv_heads, st));
    };
    dkv_out.tma_dk = make_tma_copy(SM90_TMA_STORE{}, out(p.dk, kHeadDim, p.dk_strides),
                                   typename Traits::SmemLayoutdKOut{}, Shape<typename Traits::BN, typename Traits::D>{},
                                   _1{});
    dkv_out.tma_dv = make_tma_copy(SM90_TMA_STORE{}, out(p.dv, kHeadDimV, p.dv_strides),
                                   typename Traits::SmemLayoutdVOut{},
                                   Shape<typename Traits::BN, typename Traits::DV>{}, _1{});
  }

  Args args;
  args.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, take<0, 2>(typename Traits::SmemLayoutQ{}),
                             Shape<typename Traits::BM, typename Traits::D>{}, _1{});
  args.tma_do = make_tma_copy(SM90_TMA_LOAD{}, mdO, take<0, 2>(typename Traits::SmemLayoutdO{}),
                              Shape<typename Traits::BM, typename Traits::DV>{}, _1{});
  args.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, typename Traits::SmemLayoutK{},
                             Shape<typename Traits::BN, typename Traits::D>{}, _1{});
  args.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mV, typename Traits::SmemLayoutV{},
                             Shape<typename Traits::BN, typename Traits::DV>{}, _1{});
  args.shape_q = mQ.shape();
  args.shape_do = mdO.shape();
  args.shape_k = mK.shape();
  args.shape_v = mV.shape();
  args.dkv_out = dkv_out;
  args.lse_log2 = reinterpret_cast<const float*>(wbase + ws.lse);
  args.dsum = reinterpret_cast<const float*>(wbase + ws.dsum);
  args.dq_accum = reinterpret_cast<float*>(wbase + ws.dq);
  args.dq_sem = p.deterministic ? reinterpret_cast<int*>(wbase + ws.sem) : nullptr;
  args.ws_rows = ws_rows;
  args.seqs = seqs;
  args.heads = p.heads;
  args.kv_heads = p.kv_heads;
  args.batch = p.batch;
  args.group = p.heads / p.kv_heads;
  args.num_m_blocks = num_m;
  args.num_n_blocks = num_n;
  args.key_row_blocks = (p.seq_k.rows + Traits::kBlockN - 1) / Traits::kBlockN;
  args.scale_log2 = has_softcap ? p.softcap * kLog2e : p.softmax_scale * kLog2e;
  args.softcap_pre = has_softcap ? p.softmax_scale / p.softcap : 0.f;
  args.softmax_scale = p.softmax_scale;
  args.has_softcap = has_softcap;
  args.deterministic = p.deterministic;
  args.pairs_per_group = pairs_per_group;

  // Packed keys whose grid over the longest sequence would be mostly empty (segment ids: thousands of empty
  // sequences) walk blocks of key rows instead (bwd_block_order.cuh); where it is not, the grid over the longest
  // sequence measured 10-17 % faster on the document mixes of benchmarks/bench_varlen.py (RESULTS.md, sixteenth
  // session: its launch order starts long sequences' key blocks early).
  const long long sequence_ctas = (long long)num_n * p.kv_heads * p.batch;
  const long long block_ctas = (long long)args.key_row_blocks * p.kv_heads;
  args.walk_key_blocks = varlen && p.seq_k.packed() && sequence_ctas > bwd::kSparseGridFactor * block_ctas;
  dim3 grid;
  const bool grid_ok = args.walk_key_blocks ? bwd::bwd_grid(args.key_row_blocks, p.kv_heads, 1, grid)
                                            : bwd::bwd_grid(num_n, p.kv_heads, p.batch, grid);
  if (!grid_ok) return cudaErrorInvalidConfiguration;
  if (varlen) {
    bwd::bwd_kernel<Traits, true><<<grid, dim3(Traits::kNumThreads), kSmem, stream>>>(args);
  } else {
    bwd::bwd_kernel<Traits, false><<<grid, dim3(Traits::kNumThreads), kSmem, stream>>>(args);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const long long dq_tiles = bwd::bwd_postprocess_blocks(p.seq_q, p.batch, p.heads, num_m);
  if (dq_tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  bwd::BwdPostprocessArgs<Traits> post;
  post.dq_accum = reinterpret_cast<const float*>(wbase + ws.dq);
  post.dq = static_cast<Element*>(p.dq);
  post.dq_strides = p.dq_strides;
  post.ws_rows = ws_rows;
  post.seq_q = p.seq_q;
  post.batch = p.batch;
  post.heads = p.heads;
  post.num_m = num_m;
  post.scale = p.softmax_scale;
  bwd::bwd_postprocess_kernel<Traits><<<unsigned(dq_tiles), 256, 0, stream>>>(post);
  return cudaGetLastError();
}

}  // namespace fa3

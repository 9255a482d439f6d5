// Host side of the backward: workspace carve-up, zeroing, TMA descriptors, one-time SMEM opt-in, three launches
// (preprocess, main, postprocess) on the caller's stream. No allocation, no synchronisation.
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
#include "fa3/visibility.h"

namespace fa3 {

template <class Element, int kHeadDim, int kHeadDimV>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  using namespace cute;
  using Traits = bwd::BwdTraits<Element, kHeadDim, kHeadDimV>;
  using Args = bwd::BwdArgs<Traits>;
  if (p.head_dim != kHeadDim || p.head_dim_v != kHeadDimV || p.seqlen_q < 1 || p.seqlen_k < 1 || p.batch < 1 ||
      p.heads < 1 || p.kv_heads < 1 || p.heads % p.kv_heads != 0 || p.device < 0 ||
      p.device >= kMaxDevices) {
    return cudaErrorInvalidValue;
  }
  const BwdWorkspaceLayout ws = bwd_workspace_layout(p.batch, p.seqlen_q, p.heads, kHeadDim, p.deterministic);
  if (p.workspace == nullptr || p.workspace_bytes < ws.total) return cudaErrorInvalidValue;
  char* wbase = static_cast<char*>(p.workspace);
  const int num_m = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int num_n = (p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  const int rows_padded = num_m * Traits::kBlockM;

  cudaError_t err = cudaSuccess;
  if (ws.zero_bytes > 0) {  // the deterministic mode's semaphores; the preprocess zeroes the dQ accumulator
    err = cudaMemsetAsync(wbase, 0, size_t(ws.zero_bytes), stream);
    if (err != cudaSuccess) return err;
  }

  {
    const long long total_rows = (long long)p.batch * p.heads * rows_padded;
    const long long blocks = (total_rows + bwd::kPreprocessRowsPerBlock - 1) / bwd::kPreprocessRowsPerBlock;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    bwd::bwd_preprocess_kernel<Element, kHeadDim, kHeadDimV><<<unsigned(blocks), 256, 0, stream>>>(
        static_cast<const Element*>(p.dout), static_cast<const Element*>(p.out), p.lse, p.dlse,
        reinterpret_cast<float*>(wbase + ws.lse), reinterpret_cast<float*>(wbase + ws.dsum),
        reinterpret_cast<float*>(wbase + ws.dq), p.seqlen_q, p.heads, rows_padded, total_rows);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  auto bshd = [](int seqlen, int d, int heads, int batch) {  // (seqlen, d, heads, batch) view of a BSHD tensor
    return make_layout(typename Traits::ShapeQKV{seqlen, d, heads, batch},
                       typename Traits::StrideQKV{int64_t(heads) * d, _1{}, int64_t(d), int64_t(seqlen) * heads * d});
  };
  auto make_gmem = [&](const void* ptr, int seqlen, int d, int heads, int batch) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), bshd(seqlen, d, heads, batch));
  };
  auto mQ = make_gmem(p.q, p.seqlen_q, kHeadDim, p.heads, p.batch);
  auto mdO = make_gmem(p.dout, p.seqlen_q, kHeadDimV, p.heads, p.batch);
  auto mK = make_gmem(p.k, p.seqlen_k, kHeadDim, p.kv_heads, p.batch);
  auto mV = make_gmem(p.v, p.seqlen_k, kHeadDimV, p.kv_heads, p.batch);

  const Visibility vis = Visibility::make(p.window_left, p.window_right, p.seqlen_q, p.seqlen_k);
  constexpr float kLog2e = 1.4426950408889634f;
  const bool has_softcap = p.softcap > 0.f;

  constexpr int kSmem = Traits::kSmemBytes;
  const LaunchSetup& setup = launch_setup<bwd::bwd_kernel<Traits>>(kSmem, p.device);
  if (setup.err != cudaSuccess) return setup.err;
  const bool masked = !vis.unbounded();
  const int pairs_per_group =  // CTA order
      bwd::bwd_pairs_per_group(num_n, p.kv_heads * p.batch, masked, p.deterministic, setup.num_sms);

  const auto dkv_out = [&] {
    if constexpr (Traits::kTmaStoreDKV) {
      auto out = [&](void* ptr, int d) {
        return make_tensor(make_gmem_ptr(static_cast<Element*>(ptr)), bshd(p.seqlen_k, d, p.kv_heads, p.batch));
      };
      return bwd::BwdDKVOut<Traits>{
          make_tma_copy(SM90_TMA_STORE{}, out(p.dk, kHeadDim), typename Traits::SmemLayoutdKOut{},
                        Shape<typename Traits::BN, typename Traits::D>{}, _1{}),
          make_tma_copy(SM90_TMA_STORE{}, out(p.dv, kHeadDimV), typename Traits::SmemLayoutdVOut{},
                        Shape<typename Traits::BN, typename Traits::DV>{}, _1{})};
    } else {
      return bwd::BwdDKVOut<Traits>{static_cast<Element*>(p.dk), static_cast<Element*>(p.dv)};
    }
  }();

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
  args.vis = vis;
  args.heads = p.heads;
  args.kv_heads = p.kv_heads;
  args.batch = p.batch;
  args.group = p.heads / p.kv_heads;
  args.num_m_blocks = num_m;
  args.num_n_blocks = num_n;
  args.scale_log2 = has_softcap ? p.softcap * kLog2e : p.softmax_scale * kLog2e;
  args.softcap_pre = has_softcap ? p.softmax_scale / p.softcap : 0.f;
  args.softmax_scale = p.softmax_scale;
  args.has_softcap = has_softcap;
  args.deterministic = p.deterministic;
  args.pairs_per_group = pairs_per_group;

  dim3 grid;
  if (!bwd::bwd_grid(num_n, p.kv_heads, p.batch, grid)) return cudaErrorInvalidConfiguration;
  bwd::bwd_kernel<Traits><<<grid, dim3(Traits::kNumThreads), kSmem, stream>>>(args);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const long long dq_tiles = (long long)p.batch * p.heads * num_m;
  if (dq_tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  bwd::bwd_postprocess_kernel<Traits><<<unsigned(dq_tiles), 256, 0, stream>>>(
      reinterpret_cast<const float*>(wbase + ws.dq), static_cast<Element*>(p.dq), p.seqlen_q, p.heads, num_m,
      p.softmax_scale);
  return cudaGetLastError();
}

}  // namespace fa3

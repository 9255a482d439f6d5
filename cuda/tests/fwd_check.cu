// Standalone check and benchmark of fa3::run_fwd (no JAX).
//
// Correctness: random normal q/k/v, output poisoned with NaN, compared with a CPU fp32 reference using the FA3 rule
// (docs/kernels.md §9.1): max|out - ref| <= rtol * max|pt - ref| + atol, rtol = 2 (3 with softcap),
// atol = 2 * rounding noise of the dtype near 0.3; pt = the reference with P rounded to the input dtype before P V
// and the output rounded. Also checks lse, and that rows with no visible key give out = 0 and lse = -inf.
// Benchmark: b * s = 16k tokens, hidden 2048, TFLOP/s = 4 b h s s d / t (halved for causal), median of cudaEvents.
//
// Usage: fwd_check [--quick] [--bench-only] [--no-bench] [--filter NAME]   (NAME e.g. bf16_128x128)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <string>
#include <thread>
#include <vector>

#include "fa3/fwd_launch.h"
#include "fa3_kernel_list.h"

namespace {

#define CUDA_CHECK(x)                                                                         \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__, #x);                                                             \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

// ---- 16-bit conversions on the host (round to nearest even) ----
uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float bf2f(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t f2h(float f) {
  // via the hardware-independent path: use _Float16 if available
  _Float16 h = (_Float16)f;
  uint16_t r;
  std::memcpy(&r, &h, 2);
  return r;
}
float h2f(uint16_t x) {
  _Float16 h;
  std::memcpy(&h, &x, 2);
  return (float)h;
}

struct DType {
  bool bf16;
  uint16_t to(float f) const { return bf16 ? f2bf(f) : f2h(f); }
  float from(uint16_t h) const { return bf16 ? bf2f(h) : h2f(h); }
  float round(float f) const { return from(to(f)); }
};

using LaunchFn = cudaError_t (*)(const fa3::FwdParams&, cudaStream_t);
struct Kernel {
  const char* name;
  bool bf16;
  int d, dv;
  LaunchFn fn;
};

#define FA3_CHECK_ENTRY(T, NAME, D, DV) \
  Kernel{#NAME "_" #D "x" #DV, std::strcmp(#NAME, "bf16") == 0, D, DV, &fa3::run_fwd<T, D, DV>},
const Kernel kKernels[] = {FA3_JAX_FWD_KERNELS(FA3_CHECK_ENTRY)};

struct Case {
  int b, sq, sk, h, hk;
  int64_t wl, wr;  // already resolved (Python convention)
  float softcap;
  std::string label;
};

int run_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// CPU reference for one case. Outputs ref (fp32), pt (P rounded to dtype, output rounded), lse, visible count.
void reference(const Case& c, int d, int dv, float scale, const DType& dt, const std::vector<float>& q,
               const std::vector<float>& k, const std::vector<float>& v, std::vector<float>& ref,
               std::vector<float>& pt, std::vector<float>& lse, std::vector<int>& nvis) {
  ref.assign(size_t(c.b) * c.sq * c.h * dv, 0.f);
  pt.assign(ref.size(), 0.f);
  lse.assign(size_t(c.b) * c.h * c.sq, 0.f);
  nvis.assign(lse.size(), 0);
  const int group = c.h / c.hk;
  const int64_t off = int64_t(c.sk) - c.sq;
  const int nthreads = run_threads();
  const int64_t total_rows = int64_t(c.b) * c.h * c.sq;
  auto work = [&](int tid) {
    std::vector<float> s(c.sk), p(c.sk);
    std::vector<double> acc(dv), acc_pt(dv);
    for (int64_t idx = tid; idx < total_rows; idx += nthreads) {
      const int i = int(idx % c.sq);
      const int hh = int((idx / c.sq) % c.h);
      const int bb = int(idx / (int64_t(c.sq) * c.h));
      const int kh = hh / group;
      const float* qr = &q[((size_t(bb) * c.sq + i) * c.h + hh) * d];
      float mx = -INFINITY;
      int cnt = 0;
      for (int j = 0; j < c.sk; ++j) {
        const bool visible = j >= i + off - c.wl && j <= i + off + c.wr;
        if (!visible) {
          s[j] = -INFINITY;
          continue;
        }
        const float* kr = &k[((size_t(bb) * c.sk + j) * c.hk + kh) * d];
        float dot = 0.f;
        for (int x = 0; x < d; ++x) dot += qr[x] * kr[x];
        float sc = dot * scale;
        if (c.softcap > 0.f) sc = c.softcap * std::tanh(sc / c.softcap);
        s[j] = sc;
        mx = std::max(mx, sc);
        ++cnt;
      }
      const size_t lrow = (size_t(bb) * c.h + hh) * c.sq + i;
      nvis[lrow] = cnt;
      float* o = &ref[((size_t(bb) * c.sq + i) * c.h + hh) * dv];
      float* opt = &pt[((size_t(bb) * c.sq + i) * c.h + hh) * dv];
      if (cnt == 0) {
        lse[lrow] = -INFINITY;
        continue;
      }
      double sum = 0.0;
      for (int j = 0; j < c.sk; ++j) {
        p[j] = s[j] == -INFINITY ? 0.f : std::exp(s[j] - mx);
        sum += p[j];
      }
      lse[lrow] = float(mx + std::log(sum));
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(acc_pt.begin(), acc_pt.end(), 0.0);
      for (int j = 0; j < c.sk; ++j) {
        if (p[j] == 0.f) continue;
        const float pn = float(p[j] / sum);
        const float pr = dt.round(p[j]);  // 16-bit unnormalised P, as the kernel feeds P V
        const float* vr = &v[((size_t(bb) * c.sk + j) * c.hk + kh) * dv];
        for (int x = 0; x < dv; ++x) {
          acc[x] += double(pn) * vr[x];
          acc_pt[x] += double(pr) * vr[x];
        }
      }
      for (int x = 0; x < dv; ++x) {
        o[x] = float(acc[x]);
        opt[x] = dt.round(float(acc_pt[x] / sum));
      }
    }
  };
  std::vector<std::thread> ts;
  for (int t = 0; t < nthreads; ++t) ts.emplace_back(work, t);
  for (auto& t : ts) t.join();
}

fa3::FwdParams make_params(const Case& c, int d, int dv, float scale, void* q, void* k, void* v, void* o, float* lse) {
  fa3::FwdParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = o;
  p.lse = lse;
  p.q_strides = fa3::Strides::contiguous(c.sq, c.h, d);
  p.k_strides = fa3::Strides::contiguous(c.sk, c.hk, d);
  p.v_strides = fa3::Strides::contiguous(c.sk, c.hk, dv);
  p.out_strides = fa3::Strides::contiguous(c.sq, c.h, dv);
  p.lse_strides = fa3::Strides::row_stat(c.h, c.sq, false);
  p.batch = c.b;
  p.seq_q = fa3::SeqSide::bshd(c.sq);
  p.seq_k = fa3::SeqSide::bshd(c.sk);
  p.heads = c.h;
  p.kv_heads = c.hk;
  p.head_dim = d;
  p.head_dim_v = dv;
  p.softmax_scale = scale;
  p.softcap = c.softcap;
  p.window_left = c.wl;
  p.window_right = c.wr;
  int dev = 0;
  cudaGetDevice(&dev);
  p.device = dev;
  return p;
}

bool check_case(const Kernel& kn, const Case& c, std::mt19937& rng) {
  const DType dt{kn.bf16};
  const int d = kn.d, dv = kn.dv;
  const float scale = 1.f / std::sqrt(float(d));
  std::normal_distribution<float> nd(0.f, 1.f);
  const size_t nq = size_t(c.b) * c.sq * c.h * d, nk = size_t(c.b) * c.sk * c.hk * d,
               nv = size_t(c.b) * c.sk * c.hk * dv, no = size_t(c.b) * c.sq * c.h * dv,
               nl = size_t(c.b) * c.h * c.sq;
  const float qmul = c.softcap > 0.f ? c.softcap / 4.f : 1.f;
  std::vector<uint16_t> hq(nq), hk(nk), hv(nv);
  std::vector<float> fq(nq), fk(nk), fv(nv);
  for (size_t i = 0; i < nq; ++i) { hq[i] = dt.to(nd(rng) * qmul); fq[i] = dt.from(hq[i]); }
  for (size_t i = 0; i < nk; ++i) { hk[i] = dt.to(nd(rng)); fk[i] = dt.from(hk[i]); }
  for (size_t i = 0; i < nv; ++i) { hv[i] = dt.to(nd(rng)); fv[i] = dt.from(hv[i]); }
  void *dq, *dk, *dv_, *dout;
  float* dlse;
  CUDA_CHECK(cudaMalloc(&dq, nq * 2));
  CUDA_CHECK(cudaMalloc(&dk, nk * 2));
  CUDA_CHECK(cudaMalloc(&dv_, nv * 2));
  CUDA_CHECK(cudaMalloc(&dout, no * 2));
  CUDA_CHECK(cudaMalloc(&dlse, nl * 4));
  CUDA_CHECK(cudaMemcpy(dq, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dk, hk.data(), nk * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dv_, hv.data(), nv * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemset(dout, 0xff, no * 2));   // NaN poison (0xffff is NaN in both 16-bit types)
  CUDA_CHECK(cudaMemset(dlse, 0xff, nl * 4));   // NaN poison
  fa3::FwdParams p = make_params(c, d, dv, scale, dq, dk, dv_, dout, dlse);
  cudaError_t err = kn.fn(p, 0);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  std::vector<uint16_t> ho(no);
  std::vector<float> hl(nl);
  bool ok = err == cudaSuccess;
  if (ok) {
    CUDA_CHECK(cudaMemcpy(ho.data(), dout, no * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(hl.data(), dlse, nl * 4, cudaMemcpyDeviceToHost));
  }
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dv_);
  cudaFree(dout);
  cudaFree(dlse);
  if (!ok) {
    std::printf("FAIL %-14s %-34s launch/run error: %s\n", kn.name, c.label.c_str(), cudaGetErrorString(err));
    return false;
  }
  std::vector<float> ref, pt, lref;
  std::vector<int> nvis;
  reference(c, d, dv, scale, dt, fq, fk, fv, ref, pt, lref, nvis);
  double err_out = 0, err_pt = 0, err_lse = 0;
  size_t nan_count = 0, empty_bad = 0, empty_rows = 0;
  for (size_t i = 0; i < no; ++i) {
    const float o = dt.from(ho[i]);
    if (!std::isfinite(o)) { ++nan_count; continue; }
    err_out = std::max(err_out, double(std::fabs(o - ref[i])));
    err_pt = std::max(err_pt, double(std::fabs(pt[i] - ref[i])));
  }
  for (int bb = 0; bb < c.b; ++bb)
    for (int hh = 0; hh < c.h; ++hh)
      for (int i = 0; i < c.sq; ++i) {
        const size_t l = (size_t(bb) * c.h + hh) * c.sq + i;
        if (nvis[l] == 0) {
          ++empty_rows;
          bool bad = !(std::isinf(hl[l]) && hl[l] < 0);
          for (int x = 0; x < dv; ++x) bad |= dt.from(ho[((size_t(bb) * c.sq + i) * c.h + hh) * dv + x]) != 0.f;
          empty_bad += bad;
        } else if (!std::isfinite(hl[l])) {
          ++nan_count;
        } else {
          err_lse = std::max(err_lse, double(std::fabs(hl[l] - lref[l])));
        }
      }
  // FA3's atol: twice the dtype's rounding noise of (ref + 0.3 - 0.3 - ref), ref rounded to the dtype.
  double noise = 0;
  for (size_t i = 0; i < no; ++i) {
    const float r = dt.round(ref[i]);
    noise = std::max(noise, double(std::fabs(dt.round(dt.round(dt.round(r + 0.3f) - 0.3f) - r))));
  }
  const double atol = 2.0 * noise;
  const double rtol = c.softcap > 0.f ? 3.0 : 2.0;
  const double tol = rtol * err_pt + atol;
  const double lse_tol = 2e-3 + (c.softcap > 0.f ? 2e-2 : 0.0);
  ok = nan_count == 0 && empty_bad == 0 && err_out <= tol && err_lse <= lse_tol;
  std::printf("%s %-14s %-44s max|o-ref| %.2e  tol %.2e (pt %.2e)  max|lse-ref| %.2e  empty rows %zu bad %zu  nonfinite %zu\n",
              ok ? "ok  " : "FAIL", kn.name, c.label.c_str(), err_out, tol, err_pt, err_lse, empty_rows, empty_bad,
              nan_count);
  return ok;
}

std::string label(const Case& c) {
  char buf[160];
  std::string m;
  if (c.wl >= c.sk && c.wr >= c.sq) m = "full";
  else if (c.wl >= c.sk && c.wr == 0) m = "causal";
  else m = "win(" + std::to_string(c.wl) + "," + std::to_string(c.wr) + ")";
  std::snprintf(buf, sizeof(buf), "b%d s(%d,%d) h%d/%d %s%s", c.b, c.sq, c.sk, c.h, c.hk, m.c_str(),
                c.softcap > 0.f ? " softcap" : "");
  return buf;
}

std::vector<Case> cases_for(const Kernel& kn, bool quick) {
  std::vector<std::pair<int, int>> seqs = {{1, 1}, {1, 239}, {113, 203}, {128, 217}, {239, 1}, {256, 512},
                                           {799, 3}, {1023, 1024}, {1024, 1023}};
  const bool main_cfg = kn.bf16 && kn.d == 128;
  if (!quick) {
    seqs.push_back({2048, 2048});
    if (main_cfg || kn.d == 256 || kn.d == 64) seqs.push_back({4224, 4224});  // d=64: also its 192-row tile
  }
  std::vector<Case> out;
  for (const auto& sqk : seqs) {
    const int sq = sqk.first, sk = sqk.second;
    const int b = sq * sk > 1000000 ? 1 : 2;
    auto add = [&](int h, int hk, int64_t wl, int64_t wr, float cap) {
      Case c{b, sq, sk, h, hk, wl, wr, cap, ""};
      c.label = label(c);
      out.push_back(c);
    };
    add(2, 2, sk, sq, 0.f);        // no mask
    add(2, 2, sk, 0, 0.f);         // causal (bottom-right)
    if (quick && !main_cfg) continue;
    add(6, 2, sk, 0, 0.f);         // GQA causal
    add(3, 1, sk, sq, 15.f);       // MQA + softcap
    add(2, 2, 64, 32, 0.f);        // sliding window
    add(2, 1, 100, 0, 15.f);       // local causal + softcap + MQA
    add(2, 2, sk, -5, 0.f);        // negative right window
    add(2, 2, -3, 40, 0.f);        // negative left window
  }
  // Several tiles per CTA of the persistent grid (132 SMs): state carried from tile to tile (pipeline phases, Q
  // reuse, pingpong turns, O buffer), empty tiles between full ones, an L2 section boundary inside the grid.
  auto add_many = [&](int b, int sq, int sk, int h, int hk, int64_t wl, int64_t wr, float cap) {
    Case c{b, sq, sk, h, hk, wl, wr, cap, ""};
    c.label = label(c) + " (many tiles)";
    out.push_back(c);
  };
  add_many(9, 512, 512, 16, 16, 512, 0, 0.f);       // causal, 576 tiles; d=128: sections of 128 + 16 heads
  add_many(9, 384, 512, 16, 16, 512, 384, 0.f);     // no mask, 432 tiles
  add_many(4, 1024, 128, 16, 16, 128, 0, 0.f);      // causal with s_q > s_k: 7 of 8 m-blocks see no key
  add_many(16, 128, 200, 16, 16, 200, 0, 0.f);      // causal, 256 one-m-block tiles (small enough for --tiny)
  add_many(8, 256, 100, 16, 16, 100, 0, 0.f);       // causal, 256 tiles, every other one empty (--tiny)
  add_many(16, 384, 64, 16, 16, 64, 384, 0.f);      // no mask, 768 tiles as single-tile items (--tiny)
  if (kn.d == 64) add_many(1, 2048, 2048, 32, 8, 2048, 2048, 0.f);  // the 192-row tile: 132 two-tile items + 88 single
  if (!quick || main_cfg) add_many(2, 1024, 1024, 12, 4, 100, 0, 15.f);  // GQA local + softcap, 192 tiles
  return out;
}

// ---- benchmark ----
__global__ void fill_random(uint16_t* x, size_t n, uint32_t seed, bool bf16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
    uint32_t h2 = h * 747796405u + 2891336453u;
    float u1 = (h & 0xffffff) * (1.f / 16777216.f) + 1e-7f, u2 = (h2 & 0xffffff) * (1.f / 16777216.f);
    float g = sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2);
    if (bf16) {
      __nv_bfloat16 b = __float2bfloat16(g);
      x[i] = *reinterpret_cast<uint16_t*>(&b);
    } else {
      __half b = __float2half(g);
      x[i] = *reinterpret_cast<uint16_t*>(&b);
    }
  }
}

void bench(const Kernel& kn) {
  const int total = 16384, hidden = 2048;
  const int h = hidden / kn.d;
  for (int causal = 0; causal < 2; ++causal) {
    std::printf("bench %-14s %s  h=%d:", kn.name, causal ? "causal    " : "non-causal", h);
    for (int s : {512, 1024, 2048, 4096, 8192, 16384}) {
      const int b = total / s;
      Case c{b, s, s, h, h, s, causal ? 0 : s, 0.f, ""};
      const size_t nq = size_t(b) * s * h * kn.d, nv = size_t(b) * s * h * kn.dv;
      uint16_t *q, *k, *v, *o;
      float* l;
      CUDA_CHECK(cudaMalloc(&q, nq * 2));
      CUDA_CHECK(cudaMalloc(&k, nq * 2));
      CUDA_CHECK(cudaMalloc(&v, nv * 2));
      CUDA_CHECK(cudaMalloc(&o, nv * 2));
      CUDA_CHECK(cudaMalloc(&l, size_t(b) * h * s * 4));
      fill_random<<<1024, 256>>>(q, nq, 1, kn.bf16);
      fill_random<<<1024, 256>>>(k, nq, 2, kn.bf16);
      fill_random<<<1024, 256>>>(v, nv, 3, kn.bf16);
      CUDA_CHECK(cudaGetLastError());
      fa3::FwdParams p = make_params(c, kn.d, kn.dv, 1.f / std::sqrt(float(kn.d)), q, k, v, o, l);
      cudaEvent_t e0, e1;
      cudaEventCreate(&e0);
      cudaEventCreate(&e1);
      for (int i = 0; i < 3; ++i) CUDA_CHECK(kn.fn(p, 0));
      std::vector<float> ms;
      for (int i = 0; i < 30; ++i) {
        cudaEventRecord(e0);
        CUDA_CHECK(kn.fn(p, 0));
        cudaEventRecord(e1);
        CUDA_CHECK(cudaEventSynchronize(e1));
        float t;
        cudaEventElapsedTime(&t, e0, e1);
        ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      const double t = ms[ms.size() / 2] * 1e-3;
      // 2 b h s^2 (d + d_v): 4 b h s^2 d when d == d_v (every pair but 192x128)
      const double flops = 2.0 * b * h * double(s) * s * (kn.d + kn.dv) / (causal ? 2.0 : 1.0);
      const std::string label = s >= 1024 ? std::to_string(s / 1024) + "k" : std::to_string(s);
      std::printf("  %6s %6.1f", label.c_str(), flops / t * 1e-12);
      cudaEventDestroy(e0);
      cudaEventDestroy(e1);
      cudaFree(q);
      cudaFree(k);
      cudaFree(v);
      cudaFree(o);
      cudaFree(l);
    }
    std::printf("   TFLOP/s\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, bench_only = false, no_bench = false;
  long long max_elems = 1LL << 62;  // --small / --tiny: cases with seqlen_q * seqlen_k <= this (for sanitizers)
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--bench-only")) bench_only = true;
    else if (!std::strcmp(argv[i], "--no-bench")) no_bench = true;
    else if (!std::strcmp(argv[i], "--small")) { quick = true; max_elems = 300000; }
    else if (!std::strcmp(argv[i], "--tiny")) { quick = true; max_elems = 30000; }
    else if (!std::strcmp(argv[i], "--filter") && i + 1 < argc) filter = argv[++i];
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::printf("device: %s, cc %d.%d, %d SMs\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  std::mt19937 rng(1234);
  int fails = 0, total = 0;
  if (!bench_only) {
    for (const Kernel& kn : kKernels) {
      if (!filter.empty() && filter != kn.name) continue;
      for (const Case& c : cases_for(kn, quick)) {
        if ((long long)c.sq * c.sk > max_elems) continue;
        ++total;
        fails += !check_case(kn, c, rng);
      }
    }
    std::printf("correctness: %d / %d cases passed\n", total - fails, total);
  }
  if (!no_bench) {
    for (const Kernel& kn : kKernels) {
      if (!filter.empty() && filter != kn.name) continue;
      bench(kn);
    }
  }
  return fails == 0 ? 0 : 1;
}

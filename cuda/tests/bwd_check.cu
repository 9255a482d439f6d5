// Standalone check and benchmark of the backward kernels (no JAX).
//
//   bwd_check [--quick] [--no-big] [--bench | --bench-only | --bench-case D,S,CAUSAL,DET] [--sanitize] [--det-reps N]
//             [--hd D[xDV]] [--bf16-only]
//
// Correctness (docs/kernels.md §9.1): random normal inputs, CPU fp32 forward for out (rounded to the input dtype)
// and lse, CPU fp32 reference backward (`ref`) and a same-precision variant (`pt`: P and dS rounded to the input
// dtype before their GEMMs, outputs rounded). A gradient passes iff max|g - ref| <= 2 * max|pt - ref| + atol, atol = 2 * the dtype's
// rounding noise near 0.3 (+3e-4 with softcap). Outputs are poisoned with NaN before each run, so an unwritten
// element fails. Covers every compiled (dtype, d, d_v) x {none, causal, local, causal+softcap} x {MHA, GQA, MQA} x the
// awkward seqlen pairs, plus a negative right window and fully masked rows. Determinism: repeated deterministic runs
// must be bitwise identical. Benchmark: b * s = 16k tokens, hidden 2048, TFLOP/s = 10 b h s^2 d / t (halved causal).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cutlass/numeric_types.h"
#include "fa3/bwd_launch.h"
#include "fa3/workspace.h"
#include "fa3_kernel_list.h"

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

using LaunchFn = cudaError_t (*)(const fa3::BwdParams&, cudaStream_t);

static bool g_bf16_only = false;

// A hung kernel (a barrier or semaphore bug) must not eat the whole device session: wait at most 20 s.
static std::string g_current = "(none)";
static void sync_or_die() {
  cudaEvent_t e;
  CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  CK(cudaEventRecord(e));
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t r = cudaEventQuery(e);
    if (r == cudaSuccess) break;
    if (r != cudaErrorNotReady) {
      std::printf("CUDA error %s while running %s\n", cudaGetErrorString(r), g_current.c_str());
      std::exit(2);
    }
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(20)) {
      std::printf("HANG (>20 s) while running %s\n", g_current.c_str());
      std::fflush(stdout);
      _exit(3);
    }
    usleep(50);
  }
  CK(cudaEventDestroy(e));
}

struct Kernel {
  bool bf16;
  int d, dv;
  LaunchFn fn;
};

#define FA3_TEST_ENTRY(Element, dtype_name, hdim, hdimv) \
  Kernel{std::string(#dtype_name) == "bf16", hdim, hdimv, &fa3::run_bwd<Element, hdim, hdimv>},
static const std::vector<Kernel> kKernels = {FA3_JAX_BWD_KERNELS(FA3_TEST_ENTRY)};

// ---------------- host element conversions ----------------
static inline float round_to(bool bf16, float x) {
  return bf16 ? float(cutlass::bfloat16_t(x)) : float(cutlass::half_t(x));
}
static inline uint16_t to_bits(bool bf16, float x) {
  if (bf16) {
    cutlass::bfloat16_t v(x);
    return v.raw();
  }
  cutlass::half_t v(x);
  return v.raw();
}
static inline float from_bits(bool bf16, uint16_t b) {
  return bf16 ? float(cutlass::bfloat16_t::bitcast(b)) : float(cutlass::half_t::bitcast(b));
}

struct Case {
  bool bf16;
  int d, dv;
  int b, sq, sk, h, hk;
  int64_t wl, wr;
  float softcap;
  const char* mask;
  bool deterministic;
};

struct Mask {
  int sq, sk;
  int64_t wl, wr;
  bool visible(int i, int j) const {
    const int64_t off = int64_t(sk) - sq;
    return j >= i + off - wl && j <= i + off + wr;
  }
};

// CPU reference. Inputs are already rounded to the dtype (as float). Computes out (rounded), lse, and the ref / pt
// gradients.
struct Reference {
  std::vector<float> out, lse, dq, dk, dv, dq_pt, dk_pt, dv_pt;
};

static void cpu_reference(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                          const std::vector<float>& v, const std::vector<float>& dout, float scale, Reference& R) {
  const int b = c.b, sq = c.sq, sk = c.sk, h = c.h, hk = c.hk, d = c.d, dv = c.dv, g = h / hk;
  const Mask m{sq, sk, c.wl, c.wr};
  const bool cap = c.softcap > 0.f;
  R.out.assign(size_t(b) * sq * h * dv, 0.f);
  R.lse.assign(size_t(b) * h * sq, 0.f);
  R.dq.assign(size_t(b) * sq * h * d, 0.f);
  R.dq_pt = R.dq;
  R.dk.assign(size_t(b) * sk * hk * d, 0.f);
  R.dk_pt = R.dk;
  R.dv.assign(size_t(b) * sk * hk * dv, 0.f);
  R.dv_pt = R.dv;
  auto Q = [&](int bi, int i, int hi) { return &q[((size_t(bi) * sq + i) * h + hi) * d]; };
  auto K = [&](int bi, int j, int hi) { return &k[((size_t(bi) * sk + j) * hk + hi) * d]; };
  auto V = [&](int bi, int j, int hi) { return &v[((size_t(bi) * sk + j) * hk + hi) * dv]; };
  auto DO = [&](int bi, int i, int hi) { return &dout[((size_t(bi) * sq + i) * h + hi) * dv]; };
  // score and tanh for (i, j)
  auto score = [&](const float* qi, const float* kj, float& t) {
    float s = 0.f;
    for (int e = 0; e < d; ++e) s += qi[e] * kj[e];
    if (cap) {
      t = std::tanh(s * scale / c.softcap);
      return c.softcap * t;
    }
    t = 0.f;
    return s * scale;
  };
  std::vector<float> dsum(size_t(b) * h * sq);
  // forward + dq, per row
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (int bi = 0; bi < b; ++bi)
    for (int hi = 0; hi < h; ++hi)
      for (int i = 0; i < sq; ++i) {
        const int kh = hi / g;
        std::vector<float> s(sk), t(sk), p(sk);
        float mx = -INFINITY;
        for (int j = 0; j < sk; ++j) {
          s[j] = m.visible(i, j) ? score(Q(bi, i, hi), K(bi, j, kh), t[j]) : -INFINITY;
          mx = std::max(mx, s[j]);
        }
        float* o = &R.out[((size_t(bi) * sq + i) * h + hi) * dv];
        float& lse = R.lse[(size_t(bi) * h + hi) * sq + i];
        if (mx == -INFINITY) {
          lse = -INFINITY;
          for (int e = 0; e < dv; ++e) o[e] = 0.f;
          dsum[(size_t(bi) * h + hi) * sq + i] = 0.f;
          continue;  // dq row stays 0
        }
        double sum = 0;
        for (int j = 0; j < sk; ++j) sum += std::exp(double(s[j] - mx));
        lse = mx + float(std::log(sum));
        std::vector<float> acc(dv, 0.f);
        for (int j = 0; j < sk; ++j) {
          p[j] = s[j] == -INFINITY ? 0.f : std::exp(s[j] - lse);
          if (p[j] != 0.f) {
            const float* vj = V(bi, j, kh);
            for (int e = 0; e < dv; ++e) acc[e] += p[j] * vj[e];
          }
        }
        const float* doi = DO(bi, i, hi);
        float D = 0.f;
        for (int e = 0; e < dv; ++e) {
          o[e] = round_to(c.bf16, acc[e]);
          D += doi[e] * o[e];
        }
        dsum[(size_t(bi) * h + hi) * sq + i] = D;
        float* dq = &R.dq[((size_t(bi) * sq + i) * h + hi) * d];
        float* dqp = &R.dq_pt[((size_t(bi) * sq + i) * h + hi) * d];
        for (int j = 0; j < sk; ++j) {
          if (p[j] == 0.f) continue;
          const float* vj = V(bi, j, kh);
          float dp = 0.f;
          for (int e = 0; e < dv; ++e) dp += doi[e] * vj[e];
          const float fac = cap ? 1.f - t[j] * t[j] : 1.f;
          const float ds = p[j] * (dp - D) * fac;
          const float ds_pt = round_to(c.bf16, round_to(c.bf16, p[j]) * (dp - D) * fac);
          const float* kj = K(bi, j, kh);
          for (int e = 0; e < d; ++e) {
            dq[e] += scale * ds * kj[e];
            dqp[e] += scale * ds_pt * kj[e];
          }
        }
      }
  // dk, dv per key row (summed over the query heads of the group)
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (int bi = 0; bi < b; ++bi)
    for (int kh = 0; kh < hk; ++kh)
      for (int j = 0; j < sk; ++j) {
        float* dk = &R.dk[((size_t(bi) * sk + j) * hk + kh) * d];
        float* dkp = &R.dk_pt[((size_t(bi) * sk + j) * hk + kh) * d];
        float* dvr = &R.dv[((size_t(bi) * sk + j) * hk + kh) * dv];
        float* dvp = &R.dv_pt[((size_t(bi) * sk + j) * hk + kh) * dv];
        const float* kj = K(bi, j, kh);
        const float* vj = V(bi, j, kh);
        for (int hi = kh * g; hi < (kh + 1) * g; ++hi)
          for (int i = 0; i < sq; ++i) {
            const float lse = R.lse[(size_t(bi) * h + hi) * sq + i];
            if (lse == -INFINITY || !m.visible(i, j)) continue;
            float t;
            const float s = score(Q(bi, i, hi), kj, t);
            const float p = std::exp(s - lse);
            const float* doi = DO(bi, i, hi);
            float dp = 0.f;
            for (int e = 0; e < dv; ++e) dp += doi[e] * vj[e];
            const float D = dsum[(size_t(bi) * h + hi) * sq + i];
            const float fac = cap ? 1.f - t * t : 1.f;
            const float ds = p * (dp - D) * fac;
            const float p_pt = round_to(c.bf16, p);
            const float ds_pt = round_to(c.bf16, p_pt * (dp - D) * fac);
            const float* qi = Q(bi, i, hi);
            for (int e = 0; e < d; ++e) {
              dk[e] += scale * ds * qi[e];
              dkp[e] += scale * ds_pt * qi[e];
            }
            for (int e = 0; e < dv; ++e) {
              dvr[e] += p * doi[e];
              dvp[e] += p_pt * doi[e];
            }
          }
      }
  for (auto* vec : {&R.dq_pt, &R.dk_pt, &R.dv_pt})
    for (float& x : *vec) x = round_to(c.bf16, x);
}

// FA3 rule; returns true on pass. Prints the numbers on failure (or always with verbose).
static bool check(const char* name, bool bf16, float atol_extra, const std::vector<float>& got,
                  const std::vector<float>& ref, const std::vector<float>& pt, std::string& msg) {
  double err = 0, err_pt = 0, noise = 0;
  bool nan = false;
  size_t worst = 0, first_nan = size_t(-1);
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) {
      if (!nan) first_nan = i;
      nan = true;
    }
    if (double(std::fabs(got[i] - ref[i])) > err) worst = i;
    err = std::max(err, double(std::fabs(got[i] - ref[i])));
    err_pt = std::max(err_pt, double(std::fabs(pt[i] - ref[i])));
    const float r = round_to(bf16, ref[i]);
    const float a = round_to(bf16, round_to(bf16, r + 0.3f) - 0.3f);
    noise = std::max(noise, double(std::fabs(a - r)));
  }
  const double atol = 2 * noise + atol_extra;
  const bool ok = !nan && err <= 2 * err_pt + atol;
  char buf[256];
  std::snprintf(buf, sizeof buf, " %s err=%.3g@%zu(got %.4g ref %.4g) pt=%.3g atol=%.3g%s", name, err, worst,
                ref.empty() ? 0.f : got[worst], ref.empty() ? 0.f : ref[worst], err_pt, atol,
                nan ? " NaN/unwritten" : "");
  msg += buf;
  if (nan) {
    std::snprintf(buf, sizeof buf, " first-nan@%zu", first_nan);
    msg += buf;
  }
  return ok;
}

struct DeviceBuffers {
  void *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr, *dout = nullptr, *dq = nullptr, *dk = nullptr,
       *dv = nullptr, *ws = nullptr;
  float* lse = nullptr;
  int64_t ws_bytes = 0;
  void free_all() {
    for (void* p : {q, k, v, out, dout, dq, dk, dv, ws, (void*)lse})
      if (p) cudaFree(p);
    *this = DeviceBuffers{};
  }
};

static const Kernel* find_kernel(bool bf16, int d, int dv) {
  for (const Kernel& k : kKernels)
    if (k.bf16 == bf16 && k.d == d && k.dv == dv) return &k;
  return nullptr;
}

static fa3::BwdParams make_params(const Case& c, const DeviceBuffers& B, float scale) {
  fa3::BwdParams p;
  p.dout = B.dout;
  p.q = B.q;
  p.k = B.k;
  p.v = B.v;
  p.out = B.out;
  p.lse = B.lse;
  p.dq = B.dq;
  p.dk = B.dk;
  p.dv = B.dv;
  p.workspace = B.ws;
  p.workspace_bytes = B.ws_bytes;
  p.q_strides = p.dq_strides = fa3::Strides::contiguous(c.sq, c.h, c.d);
  p.dout_strides = p.out_strides = fa3::Strides::contiguous(c.sq, c.h, c.dv);
  p.k_strides = p.dk_strides = fa3::Strides::contiguous(c.sk, c.hk, c.d);
  p.v_strides = p.dv_strides = fa3::Strides::contiguous(c.sk, c.hk, c.dv);
  p.lse_strides = fa3::Strides::row_stat(c.h, c.sq, false);
  p.batch = c.b;
  p.seq_q = fa3::SeqSide::bshd(c.sq);
  p.seq_k = fa3::SeqSide::bshd(c.sk);
  p.heads = c.h;
  p.kv_heads = c.hk;
  p.head_dim = c.d;
  p.head_dim_v = c.dv;
  p.softmax_scale = scale;
  p.softcap = c.softcap;
  p.window_left = c.wl;
  p.window_right = c.wr;
  p.deterministic = c.deterministic;
  p.device = 0;
  return p;
}

static std::vector<uint16_t> to_dev_bits(bool bf16, const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = to_bits(bf16, x[i]);
  return r;
}

static void upload(void** dst, const std::vector<uint16_t>& x) {
  CK(cudaMalloc(dst, std::max<size_t>(x.size() * 2, 16)));
  CK(cudaMemcpy(*dst, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
}

static std::vector<float> download(bool bf16, const void* src, size_t n) {
  std::vector<uint16_t> bits(n);
  CK(cudaMemcpy(bits.data(), src, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = from_bits(bf16, bits[i]);
  return r;
}

static uint64_t g_seed = 1234;

// Returns true on pass.
static bool run_case(const Case& c, bool verbose) {
  const Kernel* K = find_kernel(c.bf16, c.d, c.dv);
  if (!K) return true;
  std::mt19937_64 rng(g_seed++);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto randv = [&](size_t n, float mul) {
    std::vector<float> x(n);
    for (float& e : x) e = round_to(c.bf16, nd(rng) * mul);
    return x;
  };
  const float scale = 1.f / std::sqrt(float(c.d));
  auto q = randv(size_t(c.b) * c.sq * c.h * c.d, c.softcap > 0 ? c.softcap / 4 : 1.f);
  auto k = randv(size_t(c.b) * c.sk * c.hk * c.d, 1.f);
  auto v = randv(size_t(c.b) * c.sk * c.hk * c.dv, 1.f);
  auto dout = randv(size_t(c.b) * c.sq * c.h * c.dv, 1.f);
  Reference R;
  cpu_reference(c, q, k, v, dout, scale, R);

  DeviceBuffers B;
  upload(&B.q, to_dev_bits(c.bf16, q));
  upload(&B.k, to_dev_bits(c.bf16, k));
  upload(&B.v, to_dev_bits(c.bf16, v));
  upload(&B.dout, to_dev_bits(c.bf16, dout));
  upload(&B.out, to_dev_bits(c.bf16, R.out));
  CK(cudaMalloc(&B.lse, R.lse.size() * 4));
  CK(cudaMemcpy(B.lse, R.lse.data(), R.lse.size() * 4, cudaMemcpyHostToDevice));
  const size_t nq = size_t(c.b) * c.sq * c.h * c.d, nk = size_t(c.b) * c.sk * c.hk * c.d,
               nv = size_t(c.b) * c.sk * c.hk * c.dv;
  CK(cudaMalloc(&B.dq, nq * 2));
  CK(cudaMalloc(&B.dk, nk * 2));
  CK(cudaMalloc(&B.dv, nv * 2));
  B.ws_bytes = fa3::bwd_workspace_bytes(c.b, c.sq, c.sk, c.h, c.hk, c.d, c.dv, c.deterministic, 0);
  CK(cudaMalloc(&B.ws, B.ws_bytes));
  // Poison: NaN outputs, garbage workspace (XLA gives no guarantee on its contents).
  CK(cudaMemset(B.dq, 0xff, nq * 2));
  CK(cudaMemset(B.dk, 0xff, nk * 2));
  CK(cudaMemset(B.dv, 0xff, nv * 2));
  CK(cudaMemset(B.ws, 0x7f, B.ws_bytes));
  const fa3::BwdParams p = make_params(c, B, scale);
  char desc[256];
  std::snprintf(desc, sizeof desc, "%s d=%d dv=%d b=%d sq=%d sk=%d h=%d hk=%d %s det=%d", c.bf16 ? "bf16" : "fp16", c.d,
                c.dv, c.b, c.sq, c.sk, c.h, c.hk, c.mask, int(c.deterministic));
  g_current = desc;
  CK(K->fn(p, nullptr));
  sync_or_die();
  auto dq = download(c.bf16, B.dq, nq), dk = download(c.bf16, B.dk, nk), dv = download(c.bf16, B.dv, nv);
  B.free_all();

  const float extra = c.softcap > 0 ? 3e-4f : 0.f;
  std::string msg;
  bool ok = check("dq", c.bf16, extra, dq, R.dq, R.dq_pt, msg);
  ok = check("dk", c.bf16, extra, dk, R.dk, R.dk_pt, msg) && ok;
  ok = check("dv", c.bf16, extra, dv, R.dv, R.dv_pt, msg) && ok;
  if (!ok || verbose) {
    std::printf("%s %s d=%d dv=%d b=%d sq=%d sk=%d h=%d hk=%d %s wl=%lld wr=%lld cap=%g det=%d:%s\n",
                ok ? "ok  " : "FAIL", c.bf16 ? "bf16" : "fp16", c.d, c.dv, c.b, c.sq, c.sk, c.h, c.hk, c.mask,
                (long long)c.wl, (long long)c.wr, c.softcap, int(c.deterministic), msg.c_str());
  }
  return ok;
}

// ---------------- determinism ----------------
__global__ void fill_random(uint16_t* x, size_t n, uint32_t seed, bool bf16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float u = (h & 0xffffff) / float(0x1000000) * 2.f - 1.f;  // [-1, 1)
    x[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16(u * 1.7f)) : __half_as_ushort(__float2half(u * 1.7f));
  }
}
__global__ void fill_lse(float* x, size_t n, float val) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = val + 0.25f * float(i % 7);
}

static void alloc_random(const Case& c, DeviceBuffers& B) {
  const size_t nq = size_t(c.b) * c.sq * c.h * c.d, nk = size_t(c.b) * c.sk * c.hk * c.d,
               nv = size_t(c.b) * c.sk * c.hk * c.dv, no = size_t(c.b) * c.sq * c.h * c.dv;
  auto rnd = [&](void** p, size_t n, uint32_t seed) {
    CK(cudaMalloc(p, n * 2));
    fill_random<<<1024, 256>>>(static_cast<uint16_t*>(*p), n, seed, c.bf16);
  };
  rnd(&B.q, nq, 1);
  rnd(&B.k, nk, 2);
  rnd(&B.v, nv, 3);
  rnd(&B.out, no, 4);
  rnd(&B.dout, no, 5);
  CK(cudaMalloc(&B.lse, size_t(c.b) * c.h * c.sq * 4));
  fill_lse<<<1024, 256>>>(B.lse, size_t(c.b) * c.h * c.sq, std::log(float(c.sk)) + 2.f);
  CK(cudaMalloc(&B.dq, nq * 2));
  CK(cudaMalloc(&B.dk, nk * 2));
  CK(cudaMalloc(&B.dv, nv * 2));
  B.ws_bytes = fa3::bwd_workspace_bytes(c.b, c.sq, c.sk, c.h, c.hk, c.d, c.dv, c.deterministic, 0);
  CK(cudaMalloc(&B.ws, B.ws_bytes));
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
}

static bool determinism(const Case& c, int reps) {
  const Kernel* K = find_kernel(c.bf16, c.d, c.dv);
  if (!K) return true;
  DeviceBuffers B;
  alloc_random(c, B);
  const size_t nq = size_t(c.b) * c.sq * c.h * c.d, nk = size_t(c.b) * c.sk * c.hk * c.d,
               nv = size_t(c.b) * c.sk * c.hk * c.dv;
  const fa3::BwdParams p = make_params(c, B, 1.f / std::sqrt(float(c.d)));
  std::vector<uint16_t> ref_q(nq), ref_k(nk), ref_v(nv), q(nq), k(nk), v(nv);
  int mismatches = 0;
  for (int r = 0; r < reps; ++r) {
    CK(cudaMemset(B.dq, 0xff, nq * 2));
    CK(cudaMemset(B.ws, 0x7f, B.ws_bytes));
    g_current = std::string("determinism d=") + std::to_string(c.d);
    CK(K->fn(p, nullptr));
    sync_or_die();
    auto& tq = r == 0 ? ref_q : q;
    auto& tk = r == 0 ? ref_k : k;
    auto& tv = r == 0 ? ref_v : v;
    CK(cudaMemcpy(tq.data(), B.dq, nq * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(tk.data(), B.dk, nk * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(tv.data(), B.dv, nv * 2, cudaMemcpyDeviceToHost));
    if (r > 0 && (q != ref_q || k != ref_k || v != ref_v)) ++mismatches;
  }
  B.free_all();
  std::printf("determinism %s d=%d b=%d s=%d/%d h=%d hk=%d %s det=%d: %d/%d reruns differ from run 0%s\n",
              c.bf16 ? "bf16" : "fp16", c.d, c.b, c.sq, c.sk, c.h, c.hk, c.mask, int(c.deterministic), mismatches,
              reps - 1, c.deterministic ? (mismatches ? "  <-- FAIL" : "  (bitwise identical)") : "");
  return !c.deterministic || mismatches == 0;
}

// ---------------- benchmark ----------------
static void bench(bool bf16, int d, bool causal, bool det, const std::vector<int>& seqlens) {
  const Kernel* K = find_kernel(bf16, d, d);
  if (!K) return;
  for (int s : seqlens) {
    Case c{bf16, d, d, 16384 / s, s, s, 2048 / d, 2048 / d, int64_t(s), causal ? 0 : int64_t(s), 0.f,
           causal ? "causal" : "none", det};
    DeviceBuffers B;
    alloc_random(c, B);
    const fa3::BwdParams p = make_params(c, B, 1.f / std::sqrt(float(d)));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    g_current = std::string("bench d=") + std::to_string(d) + " s=" + std::to_string(s);
    for (int w = 0; w < 3; ++w) CK(K->fn(p, nullptr));
    sync_or_die();
    std::vector<float> times;
    for (int r = 0; r < 15; ++r) {
      CK(cudaEventRecord(e0));
      CK(K->fn(p, nullptr));
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    const double ms = times[times.size() / 2];
    double flops = 10.0 * c.b * c.h * double(s) * s * d;
    if (causal) flops *= 0.5;
    std::printf("bench %s d=%d %-6s det=%d b=%2d s=%5d h=%2d: %8.3f ms  %6.1f TFLOP/s\n", bf16 ? "bf16" : "fp16", d,
                causal ? "causal" : "full", int(det), c.b, s, c.h, ms, flops / ms * 1e-9);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    B.free_all();
  }
}

int main(int argc, char** argv) {
  bool quick = false, big = true, do_bench = false, sanitize = false, tests = true;
  int det_reps = 20, only_d = 0, only_dv = 0;
  int one_d = 0, one_s = 0, one_causal = 0, one_det = 0;  // --bench-case: a single benchmark shape (for ncu)
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--no-big")) big = false;
    else if (!std::strcmp(argv[i], "--bench")) do_bench = true;
    else if (!std::strcmp(argv[i], "--bench-only")) do_bench = true, tests = false;
    else if (!std::strcmp(argv[i], "--sanitize")) sanitize = true;
    else if (!std::strcmp(argv[i], "--det-reps") && i + 1 < argc) det_reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--hd") && i + 1 < argc) {  // D or DxDV
      const char* a = argv[++i];
      only_d = std::atoi(a);
      if (const char* x = std::strchr(a, 'x')) only_dv = std::atoi(x + 1);
    }
    else if (!std::strcmp(argv[i], "--bf16-only")) g_bf16_only = true;
    else if (!std::strcmp(argv[i], "--bench-case") && i + 1 < argc) {  // D,S,CAUSAL,DET e.g. 128,8192,0,0
      do_bench = true, tests = false;
      if (std::sscanf(argv[++i], "%d,%d,%d,%d", &one_d, &one_s, &one_causal, &one_det) != 4) return 2;
    }
  }
  setvbuf(stdout, nullptr, _IOLBF, 0);
  int dev = 0;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs, cc %d.%d; %zu backward kernels compiled\n", prop.name, prop.multiProcessorCount,
              prop.major, prop.minor, kKernels.size());

  int total = 0, failed = 0;
  if (sanitize) {
    // Small shapes for compute-sanitizer: tails on both sides, GQA, masks; both dQ paths (deterministic: ordered
    // vector reductions; otherwise the bulk add from SMEM where the head dim has one).
    for (const Kernel& K : kKernels) {
      if (!K.bf16 || (only_d && K.d != only_d)) continue;
      for (auto [sq, sk] : {std::pair{113, 203}, std::pair{239, 1}}) {
        for (bool det : {true, false}) {
          Case c{true, K.d, K.dv, 1, sq, sk, 2, 1, sk, 0, 0.f, "causal", det};
          ++total;
          failed += !run_case(c, true);
        }
      }
    }
    std::printf("SUMMARY sanitize cases: %d, failed: %d\n", total, failed);
    return failed ? 1 : 0;
  }

  if (tests) {
    const std::vector<std::pair<int, int>> small = {{1, 1}, {1, 239}, {113, 203}, {128, 217}, {239, 1},
                                                    {256, 512}, {799, 3}};
    const std::vector<std::pair<int, int>> large = {{1023, 1024}, {1024, 1023}, {2048, 2048}};
    struct HeadCfg { int h, hk; const char* name; };
    const HeadCfg heads[] = {{2, 2, "MHA"}, {6, 2, "GQA"}, {6, 1, "MQA"}};
    for (const Kernel& K : kKernels) {
      if ((only_d && K.d != only_d) || (only_dv && K.dv != only_dv) || (g_bf16_only && !K.bf16)) continue;
      int kt = 0, kf = 0;
      for (int mi = 0; mi < 4; ++mi) {
        for (const HeadCfg& hc : heads) {
          for (int pass = 0; pass < 2; ++pass) {
            const auto& pairs = pass == 0 ? small : large;
            if (pass == 1 && (!big || !K.bf16 || hc.h != 2)) continue;
            if (quick && pass == 1) continue;
            for (auto [sq, sk] : pairs) {
              // GQA and the (1023, 1024) pair run deterministic (its own block order and semaphore-ordered dQ).
              const bool det = (hc.h == 6 && hc.hk == 2) || (sq == 1023 && sk == 1024);
              Case c{K.bf16, K.d, K.dv, pass == 0 ? 2 : 1, sq, sk, hc.h, hc.hk, sk, sq, 0.f, "none", det};
              if (mi == 1) c.wr = 0, c.mask = "causal";
              if (mi == 2) c.wl = 67, c.wr = 13, c.mask = "local";
              if (mi == 3) c.wr = 0, c.softcap = 15.f, c.mask = "causal+softcap";
              ++kt;
              kf += !run_case(c, false);
            }
          }
        }
      }
      // Extra: top-left causal with a 40-key left window (window_right = s_q - s_k, negative when s_k > s_q),
      // deterministic mode.
      for (auto [sq, sk] : {std::pair{113, 203}, std::pair{239, 100}, std::pair{1023, 1024}}) {
        Case c{K.bf16, K.d, K.dv, 1, sq, sk, 6, 2, int64_t(sk) - sq + 40, int64_t(sq) - sk, 0.f, "topleft-local40", true};
        ++kt;
        kf += !run_case(c, false);
      }
      std::printf("%s d=%d dv=%d: %d cases, %d failed\n", K.bf16 ? "bf16" : "fp16", K.d, K.dv, kt, kf);
      std::fflush(stdout);
      total += kt;
      failed += kf;
    }
    std::printf("SUMMARY correctness cases: %d, failed: %d\n", total, failed);

    // Determinism.
    int det_fail = 0;
    for (const Kernel& K : kKernels) {
      if (!K.bf16 || (only_d && K.d != only_d) || (only_dv && K.dv != only_dv)) continue;
      Case c{true, K.d, K.dv, 2, 1023, 1024, 6, 2, 1024, 0, 0.f, "causal", true};
      det_fail += !determinism(c, det_reps);
      if (K.d == 128) {
        Case c2{true, 128, 128, 2, 2048, 2048, 8, 8, 2048, 2048, 0.f, "none", true};
        det_fail += !determinism(c2, det_reps);
        c2.deterministic = false;
        determinism(c2, 5);  // informational: atomics order varies
      }
    }
    std::printf("SUMMARY determinism failures: %d\n", det_fail);
    failed += det_fail;
    std::fflush(stdout);
  }

  if (do_bench && one_d) {
    bench(true, one_d, one_causal != 0, one_det != 0, {one_s});
  } else if (do_bench) {
    const std::vector<int> seqlens = {1024, 2048, 4096, 8192, 16384};
    for (int d : {128, 64, 256}) {
      bench(true, d, false, false, seqlens);
      bench(true, d, true, false, seqlens);
    }
    bench(true, 128, false, true, {2048, 8192});
    bench(true, 128, true, true, {2048, 8192});
  }
  return failed ? 1 : 0;
}

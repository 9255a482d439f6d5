// Order in which the backward main kernel's CTAs (key block n, kv head, batch) are launched.
//
// Key block fastest (default), grid (num_n, kv_heads, batch): the CTAs of one (batch, kv head) pair run together and
// walk the same Q / dO tiles, so L2 serves each tile to all of them.
// Key block slowest (deterministic runs with a causal / local mask), 1-D grid, linear id = n * pairs + pair: key block
// n adds into a dQ tile only after every lower key block of its pair did (bwd_dq.cuh). In the key-fastest order all
// key blocks of a pair start together and key block n then waits for the lower ones to reach its first M-block (for
// causal: two M-blocks per key block, a chain over the whole pair); key block slowest starts them in ascending n
// across all pairs, which for causal is also longest-first. Measured (NOTES_bwd.md): +43-72 % for deterministic
// causal; -15 % for deterministic non-causal at 2k and -2 to -35 % for non-deterministic masked runs (each CTA
// streams its own Q / dO with little L2 sharing), so those keep the default.
// Either way a CTA only waits for CTAs of the same pair with lower n, i.e. lower linear ids (resident or finished):
// no deadlock.
#pragma once

#include <cuda_runtime_api.h>

#include "cute/config.hpp"

namespace fa3 {
namespace bwd {

struct CtaCoord {
  int n_block, kv_head, batch;
};

// Grid for the main kernel; false if it does not fit the launch limits.
inline bool bwd_grid(int num_n, int kv_heads, int batch, bool key_block_slowest, dim3& grid) {
  if (key_block_slowest) {
    const long long ctas = (long long)num_n * kv_heads * batch;
    if (ctas > 0x7fffffffLL) return false;
    grid = dim3(unsigned(ctas));
    return true;
  }
  if (kv_heads > 65535 || batch > 65535) return false;
  grid = dim3(unsigned(num_n), unsigned(kv_heads), unsigned(batch));
  return true;
}

CUTE_DEVICE CtaCoord bwd_cta_coord(int kv_heads, int batch, bool key_block_slowest) {
  if (!key_block_slowest) return CtaCoord{int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  const int pairs = kv_heads * batch;
  const int pair = int(blockIdx.x % unsigned(pairs));
  return CtaCoord{int(blockIdx.x / unsigned(pairs)), pair % kv_heads, pair / kv_heads};
}

}  // namespace bwd
}  // namespace fa3

// Forward tile configuration per head dim (KERNELS.md §3.1), shared by host and device code.
//
// One configuration per (d, d_v): causal/local/softcap are runtime branches, so each TU compiles one kernel.
// Where §3.1 lists different tiles per mask, we take the one that is legal for every mask with the P·V GEMM in
// register-A (RS) form:
//   d=64 / 96: 128 x 128, 2 consumer warpgroups. §3.1's 192-row tiles (3 consumer warpgroups, 512 threads) were
//              tried: ptxas then caps the whole kernel at 65536/512 = 128 registers and the consumers spilled
//              (d=64: 20 B, d=96: 128 B of spill loads), setmaxnreg notwithstanding. Revisit with a leaner consumer.
//   d=128:     128 x 128 (the causal/local tile; 128x176 is a tuning step, §2 v7).
//   d=192:     128 x 112;  (192,128): 128 x 128;  d=256: 128 x 80.
// Registers: 24/240 (producer/consumer) with 2 consumer warpgroups, 32/160 with 3: 128*24 + 256*240 and
// 128*32 + 384*160 both stay within the 64K-register file.
#pragma once

namespace fa3 {

template <int kHeadDim, int kHeadDimV>
struct FwdTileSize {
  static_assert(kHeadDim % 16 == 0 && kHeadDimV % 16 == 0 && kHeadDim <= 256 && kHeadDimV <= 256,
                "head dims must be multiples of 16 and <= 256");
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : (kHeadDim <= 192 ? (kHeadDimV <= 128 ? 128 : 112) : 80);
  static constexpr int kStages = 2;  // K and V each
  static constexpr int kNumMmaWarpGroups = kBlockM / 64;
  static constexpr int kNumThreads = 128 * (kNumMmaWarpGroups + 1);
  // Every head dim runs the intra-warpgroup overlap (§2 v4: P V of block n+1 in flight during the softmax of block
  // n; mainloop_fwd.cuh). d >= 192 used the serial v2 loop until the overlap compiled spill-free there (uniform
  // SMEM descriptors); with it they measured 5-20 % faster at 2k-16k (H100, benchmarks/NOTES_fwd.md v6).
  // Pingpong between the two consumer warpgroups where GEMM and softmax times are comparable (FA3: d <= 128).
  static constexpr bool kPingpong = kHeadDim <= 128 && kNumMmaWarpGroups == 2;
  // Persistent grid (§2 v5): one CTA per SM loops over tiles, the producer loading the next tile's Q and K while
  // the consumers finish the current one. Needs O in its own SMEM buffer (Q's is being refilled): d <= 128 has the
  // room (d=128: Q 32 + O 32 + K 64 + V 64 KB = 192 KB), d >= 192 does not (216-224 KB without it) and keeps one
  // CTA per tile with O staged in Q's buffer.
  static constexpr bool kPersistent = kHeadDim <= 128 && kHeadDimV <= 128;
  static constexpr int kProducerRegs = kNumMmaWarpGroups == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kNumMmaWarpGroups == 2 ? 240 : 160;
};

}  // namespace fa3

// Forward tile configuration per head dim (docs/kernels.md §2.8), shared by host and device code.
//
// One configuration per (d, d_v), except d=64's two: causal/local/softcap are runtime branches. Where FA3 uses
// different tiles per mask, we take the one that is legal for every mask with the P·V GEMM in register-A (RS) form:
//   d=64:      128 x 128 (2 consumer warpgroups, pingpong) and FA3's 192 x 128 (3 consumer warpgroups, 512 threads,
//              pingpong round robin), chosen per call by the rows' key span (fwd_launch.cuh): the tall tile measured
//              +2-10 % from 4k tokens up and -16 to -22 % at causal 1k-2k (H100, NOTES_fwd.md v6b), and with the
//              round robin +2 % at non-causal 2k (H200, v7). ptxas caps a 512-thread kernel at 128 registers,
//              setmaxnreg notwithstanding: it spills 124 B (164 B of loads) with the warp-uniform descriptor slicing,
//              the turn ring and the v8 tile schedule (56 B before that schedule, 48 / 60 B without the ring, 144 B
//              without the slicing; the count moves by tens of bytes with the tile loop's formulation), outside the
//              measured cost.
//   d=96:      128 x 128. The 192-row tile spilled 128 B of loads at 128 registers.
//   d=128:     128 x 128 (FA3's causal/local tile; its non-causal 128x176 is a later tuning step).
//   d=192:     128 x 112;  (192,128): 128 x 128;  d=256: 128 x 80.
// Registers: 24/240 (producer/consumer) with 2 consumer warpgroups, 32/160 with 3: 128*24 + 256*240 and
// 128*32 + 384*160 both stay within the 64K-register file.
#pragma once

namespace fa3 {

// Whether the forward of head dims (d, d_v) runs the persistent grid (FwdTileSize::kPersistent says why); also asked
// by the host when it sizes the workspace.
constexpr bool fwd_persistent(int head_dim, int head_dim_v) { return head_dim <= 128 && head_dim_v <= 128; }

// kBlockM_: 128, or 192 for the tall tile of head dim 64 (fwd_launch.cuh picks it per call).
template <int kHeadDim, int kHeadDimV, int kBlockM_ = 128>
struct FwdTileSize {
  static_assert(kHeadDim % 16 == 0 && kHeadDimV % 16 == 0 && kHeadDim <= 256 && kHeadDimV <= 256,
                "head dims must be multiples of 16 and <= 256");
  static_assert(kBlockM_ == 128 || (kBlockM_ == 192 && kHeadDim <= 64 && kHeadDimV <= 64),
                "192-row tiles only at head dim <= 64 (register budget of 3 consumer warpgroups)");
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : (kHeadDim <= 192 ? (kHeadDimV <= 128 ? 128 : 112) : 80);
  static constexpr int kStages = 2;  // K and V each
  static constexpr int kNumMmaWarpGroups = kBlockM / 64;
  static constexpr int kNumThreads = 128 * (kNumMmaWarpGroups + 1);
  // Every head dim runs the intra-warpgroup overlap (docs/kernels.md §2.5: P V of block n+1 in flight during the
  // softmax of block n; mainloop_fwd.cuh). d >= 192 used the serial v2 loop until the overlap compiled spill-free there (uniform
  // SMEM descriptors); with it they measured 0 to +16 % at 4k-16k and -6 to +13 % at 1k-2k (H100, NOTES_fwd.md v6).
  // Pingpong between the consumer warpgroups where GEMM and softmax times are comparable (FA3: d <= 128). With
  // three (d=64, 192 rows) the turn goes round robin: up to +4 % over free-running warpgroups (NOTES_fwd.md v7).
  static constexpr bool kPingpong = kHeadDim <= 128;
  // Persistent grid (docs/kernels.md §2.9): one CTA per SM loops over tiles, the producer loading the next tile's Q
  // and K while the consumers finish the current one. Needs O in its own SMEM buffer (Q's is being refilled): d <= 128 has the
  // room (d=128: Q 32 + O 32 + K 64 + V 64 KB = 192 KB), d >= 192 does not (216-224 KB without it) and keeps one
  // CTA per tile with O staged in Q's buffer.
  static constexpr bool kPersistent = fwd_persistent(kHeadDim, kHeadDimV);
  // Split-KV (fa3/split_kv.h) is compiled into the 128-row tiles only: decode and short-query calls, which split,
  // never pick the tall tile, and the split branches cost the 192-row tile's 128-register consumers spills
  // (ptxas: 312 B instead of 208 B of stores).
  static constexpr bool kSplitKV = kBlockM == 128;
  static constexpr int kProducerRegs = kNumMmaWarpGroups == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kNumMmaWarpGroups == 2 ? 240 : 160;
};

}  // namespace fa3

// XLA FFI handler "fa3_jax_segment_layout": segment ids -> the packed sequence layout of the batch's rows back to
// back (fa3/segment_layout.cuh), so that a flash_attn_func call with segment ids runs the varlen kernels after one
// small derivation instead of a chain of XLA scatters and scans (docs/integration.md §4.9).
//
// Operands segment_ids (b, s) int32 (a vmapped call arrives folded into more rows: fa3_jax/_ops.py fold_vmap).
// Results  cu_seqlens (b * m + 1) int32, seqused (b * m) int32, workspace uint8 (the per-chunk prefixes, sized by
//          fa3::segment_layout_workspace_bytes, fa3/workspace.h).
// Attrs    max_segments i64 (m >= 1).
//
// kCmdBufferCompatible: three kernel launches, no allocation, no host reads of device data.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "fa3/segment_layout.cuh"
#include "fa3/workspace.h"
#include "handler_checks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

int64_t fa3::segment_layout_workspace_bytes(int64_t rows, int64_t seqlen) {
  return int64_t(sizeof(int32_t)) * fa3::segments::Chunks{int(rows), int(seqlen)}.workspace_words();
}

namespace {

ffi::Error Fa3SegmentLayout(cudaStream_t stream, int32_t device, ffi::AnyBuffer ids,
                            ffi::Result<ffi::AnyBuffer> cu_seqlens, ffi::Result<ffi::AnyBuffer> seqused,
                            ffi::Result<ffi::AnyBuffer> workspace, int64_t max_segments) {
  const std::string target = "fa3_jax_segment_layout";
  if (ffi::Error e = fa3::handler::check_hopper_device(target, device); e.failure()) return e;
  const auto dims = ids.dimensions();
  if (ids.element_type() != ffi::DataType::S32 || dims.size() != 2) {
    return ffi::Error::InvalidArgument(target + ": segment_ids must be int32 (batch, seqlen), got " +
                                       fa3::handler::dims_str(dims));
  }
  const int64_t rows = dims[0], seqlen = dims[1];
  const int64_t slots = rows * max_segments;
  if (rows < 1 || seqlen < 1 || max_segments < 1 || rows * seqlen > INT32_MAX || slots + 1 > INT32_MAX) {
    return ffi::Error::InvalidArgument(target + ": need batch, seqlen, max_segments >= 1 and fewer than 2^31 ids "
                                       "and slots, got " + fa3::handler::dims_str(dims) + " with max_segments " +
                                       std::to_string(max_segments));
  }
  if (cu_seqlens->element_count() != size_t(slots + 1) || seqused->element_count() != size_t(slots) ||
      workspace->size_bytes() != size_t(fa3::segment_layout_workspace_bytes(rows, seqlen))) {
    return ffi::Error::InvalidArgument(target + ": result sizes do not match batch * max_segments or the "
                                       "workspace of fa3::segment_layout_workspace_bytes");
  }
  const fa3::segments::SegmentLayoutArgs args{
      static_cast<const int32_t*>(ids.untyped_data()), static_cast<int32_t*>(workspace->untyped_data()),
      static_cast<int32_t*>(cu_seqlens->untyped_data()), static_cast<int32_t*>(seqused->untyped_data()),
      int(rows), int(seqlen), int(max_segments)};
  const cudaError_t err = fa3::segments::run_segment_layout(args, stream);
  if (err != cudaSuccess) return ffi::Error::Internal(target + ": launch failed: " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_jax_segment_layout, Fa3SegmentLayout,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // segment_ids
                                  .Ret<ffi::AnyBuffer>()  // cu_seqlens
                                  .Ret<ffi::AnyBuffer>()  // seqused
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<int64_t>("max_segments"),
                              {ffi::Traits::kCmdBufferCompatible});

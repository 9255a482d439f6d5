// Optional operands of an FFI op: they follow the op's required operands, in the order of the op's operand table
// (fa3_jax/_ops.py), and each is present iff the call's bool attribute `with_<name>` is true. One handler thus serves
// every combination of optional inputs, and an operand added later never shifts the others. Host-only.
#pragma once

#include <array>
#include <cstddef>
#include <optional>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace fa3::handler {

namespace ffi = xla::ffi;

// Fills operands[i] for every i with present[i]; fails if the remaining operands are not exactly those announced.
template <std::size_t N>
ffi::Error decode_optional_operands(const std::string& target, const ffi::RemainingArgs& rest,
                                    const std::array<bool, N>& present,
                                    std::array<std::optional<ffi::AnyBuffer>, N>& operands) {
  std::size_t next = 0;
  for (std::size_t i = 0; i < N; ++i) {
    if (!present[i]) continue;
    if (next >= rest.size()) break;
    ffi::ErrorOr<ffi::AnyBuffer> buffer = rest.get<ffi::AnyBuffer>(next++);
    if (buffer.has_error()) return buffer.error();
    operands[i] = *buffer;
  }
  std::size_t announced = 0;
  for (bool p : present) announced += p;
  if (next != announced || rest.size() != announced) {
    return ffi::Error::InvalidArgument(target + ": " + std::to_string(rest.size()) + " optional operands, but the " +
                                       "with_* attributes announce " + std::to_string(announced));
  }
  return ffi::Error::Success();
}

}  // namespace fa3::handler

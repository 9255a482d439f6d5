"""The compiled CUDA extension, if this build has one: registers its XLA FFI targets once and answers which
kernels were built. Importing never starts a JAX backend and never needs a GPU."""

from __future__ import annotations

import importlib

import jax

try:
  module = importlib.import_module("fa3_jax._fa3_jax_cuda")
  import_error = None
except ImportError as e:  # a pure-Python build, or a broken one: both leave the reference path
  module = None
  import_error = e

_DTYPE_TAGS = {"bf16": "bfloat16", "fp16": "float16"}

if module is not None:
  # Registration is deferred by JAX until the CUDA backend starts, so this is harmless on CPU-only machines.
  for _name, _capsule in module.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA", api_version=1)
  build_info = module.build_info()
else:
  build_info = {}


def compiled_kernels(direction: str) -> frozenset[tuple[str, int, int]]:
  """{(dtype name, head_dim, head_dim_v)} compiled for direction "fwd" or "bwd"; empty without the extension."""
  return frozenset((_DTYPE_TAGS[t], d, dv) for t, d, dv in build_info.get(f"{direction}_kernels", ()))


def workspace_bytes(direction: str, *shape_args) -> int:
  """Size of the workspace result a handler expects (0 without the extension, where only lowering happens)."""
  if module is None:
    return 0
  return int(getattr(module, f"{direction}_workspace_bytes")(*shape_args))

"""GPU tests run only where a Hopper GPU and a CUDA build of fa3_jax are present; elsewhere they skip with the
reason (they are marked `gpu`, so `pytest -m "not gpu"` deselects them)."""

import jax
import pytest


def hopper_and_kernels():
  from fa3_jax import _extension
  if _extension.module is None:
    return f"fa3_jax was built without the CUDA extension ({_extension.import_error})"
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus:
    return "no GPU visible to JAX"
  if getattr(gpus[0], "compute_capability", "9.0") != "9.0":
    return f"needs a Hopper GPU (compute capability 9.0), found {gpus[0].device_kind}"
  return None


def pytest_collection_modifyitems(config, items):
  reason = None
  for item in items:
    if "gpu" in item.keywords:
      reason = reason or hopper_and_kernels() or ""
      if reason:
        item.add_marker(pytest.mark.skip(reason=reason))

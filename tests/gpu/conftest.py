"""GPU tests run only where a Hopper GPU and a CUDA build of fa3_jax are present; elsewhere they skip with the
reason (they are marked `gpu`, so `pytest -m "not gpu"` deselects them; tests/conftest.py prints the reason once)."""

import pytest

from fa3_jax import testing


def pytest_collection_modifyitems(config, items):
  gpu_items = [item for item in items if "gpu" in item.keywords]
  reason = testing.kernel_problem() if gpu_items else None
  if reason:
    for item in gpu_items:
      item.add_marker(pytest.mark.skip(reason=reason))

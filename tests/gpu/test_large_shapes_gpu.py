"""Shapes at the launch limits of the CUDA kernels: batch or head counts above 65535 (a grid's y / z limit) run,
forward and backward, against the float32 reference with the FA3 rule. vmap folds its axis into the batch, so
grad(vmap(...)) over a modest model reaches such batches."""

import jax.numpy as jnp
import pytest

from fa3_jax import _extension, testing

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch, heads, kv_heads", [(70_000, 1, 1), (1, 70_000, 1), (1, 70_000, 70_000)])
def test_batch_and_heads_beyond_65535(batch, heads, kv_heads):
  if ("bfloat16", 64, 64) not in _extension.compiled_kernels("bwd"):
    pytest.skip("needs the bf16 head dim 64 kernels")
  results = testing.check_kernel(jnp.bfloat16, 64, 64, 3, 5, batch=batch, heads=heads, kv_heads=kv_heads,
                                 causal=True, seed=3)
  failures = [msg for ok, msg in results if not ok]
  assert not failures, failures

"""The FA3 tolerance helper that the GPU tests and the self-check rely on: it passes a correct implementation and
catches a wrong one (CPU: the reference plays the kernel)."""

import jax.numpy as jnp
import numpy as np
import pytest

from fa3_jax import _ops
from fa3_jax import testing


def test_atol_is_the_dtype_noise_near_0_3_even_for_zero_references():
  zeros = np.zeros(8, np.float32)
  # bfloat16 spacing near 0.3 is 2**-9; the rounding of 0.3 itself is 7.8e-4, doubled.
  assert testing.fa3_tolerance(zeros, zeros, jnp.bfloat16, rtol=2.0) == pytest.approx(2 * 7.82e-4, rel=1e-2)
  assert testing.fa3_tolerance(zeros, zeros, jnp.float16, rtol=2.0) < 1e-3


def test_rtol_scales_the_same_precision_error():
  ref = np.full(4, 0.5, np.float32)
  pt = ref + 0.01
  assert testing.fa3_tolerance(ref, pt, jnp.float16, rtol=3.0) == pytest.approx(0.03, abs=5e-4)


def test_check_kernel_passes_the_reference():
  results = testing.check_kernel(jnp.float16, 32, 32, 37, 53, batch=1, heads=2, kv_heads=1, causal=True)
  assert [name.split(":")[0] for _, name in results] == ["out", "lse", "dq", "dk", "dv"]
  assert all(ok for ok, _ in results), results


def test_check_kernel_catches_a_wrong_output(monkeypatch):
  correct = _ops.attention_fwd
  monkeypatch.setattr(_ops, "attention_fwd", lambda q, k, v, cfg: (lambda o, l: (o * 1.02, l))(*correct(q, k, v, cfg)))
  results = dict((msg.split(":")[0], ok) for ok, msg in
                 testing.check_kernel(jnp.bfloat16, 32, 32, 40, 40, batch=1, heads=2, kv_heads=2, backward=False))
  assert results == {"out": False, "lse": True}


def test_check_kernel_catches_a_wrong_gradient(monkeypatch):
  correct = _ops.attention_bwd
  monkeypatch.setattr(_ops, "attention_bwd",
                      lambda *args, **kw: (lambda dq, dk, dv: (dq, dk * 1.05, dv))(*correct(*args, **kw)))
  results = dict((msg.split(":")[0], ok) for ok, msg in
                 testing.check_kernel(jnp.bfloat16, 32, 32, 40, 40, batch=1, heads=2, kv_heads=2))
  assert results == {"out": True, "lse": True, "dq": True, "dk": False, "dv": True}

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
  monkeypatch.setattr(_ops, "attention_fwd", lambda *args: (lambda o, l: (o * 1.02, l))(*correct(*args)))
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


PACKING = testing.Packing((5, 0, 23), (9, 4, 30), used_q=(5, 0, 20), used_k=(3, 4, 30), extra_q=4, extra_k=2)


def test_check_kernel_with_a_packing_passes_the_reference():
  results = testing.check_kernel(jnp.bfloat16, 32, 32, 25, 31, heads=4, kv_heads=2, causal=True, packing=PACKING)
  assert [name.split(":")[0] for _, name in results] == ["out", "lse", "dq", "dk", "dv", "uncovered rows"]
  assert all(ok for ok, _ in results), results
  assert "7 query rows and 8 key rows exactly 0 / -inf: True" in results[-1][1]


def test_check_kernel_with_a_packing_catches_nonzero_uncovered_rows(monkeypatch):
  correct = _ops.attention_bwd
  # A backward that leaks gradient into every key row, those of no sequence included.
  monkeypatch.setattr(_ops, "attention_bwd", lambda *args, **kw: (lambda dq, dk, dv: (dq, dk, dv + 1e-6))(
      *correct(*args, **kw)))
  results = dict((msg.split(":")[0], ok) for ok, msg in
                 testing.check_kernel(jnp.bfloat16, 32, 32, 25, 31, heads=2, kv_heads=2, packing=PACKING))
  assert results == {"out": True, "lse": True, "dq": True, "dk": True, "dv": True, "uncovered rows": False}

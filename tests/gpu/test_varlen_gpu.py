"""Our CUDA kernels on variable-length (packed) inputs, flash_attn_varlen_func, against the float32 reference with the
FA3 tolerance rule (fa3_jax.testing with a Packing) on fresh random inputs: out, lse, dq, dk, dv, and rows of no
sequence exactly 0 (lse -inf).

The grid crosses dtypes x compiled head dims x masks, rotating the packings (lengths 0, 1, 17, 113, 128, 1023, 4097,
seqused below the allotments, rows after cu_seqlens[-1], bounds above every length, runs of empty sequences) and MHA / GQA / MQA through the
cases. Each case is one compiled program (forward, backward, reference and baseline together).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import _extension, testing
from fa3_jax.testing import Packing

pytestmark = pytest.mark.gpu

MASKS = {"none": {}, "causal": dict(causal=True), "local": dict(window_size=(97, 31)),
         "softcap": dict(causal=True, softcap=15.0)}
LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}
HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)]
# name: (packing, (max_seqlen_q, max_seqlen_k))
PACKINGS = {
    "self": (Packing((17, 0, 113, 1, 128, 1023), (17, 0, 113, 1, 128, 1023)), (1023, 1023)),
    "cross_seqused_gaps": (Packing((1, 113, 128, 17, 1023), (239, 113, 17, 300, 1), used_q=(1, 100, 128, 0, 1000),
                                   used_k=(239, 113, 5, 300, 1), extra_q=7, extra_k=33), (1500, 1200)),
    "long": (Packing((4097, 1, 0, 17), (4097, 128, 5, 17), extra_q=3, extra_k=1), (4097, 4097)),
    # Runs of empty sequences inside the packing and after its last row (a padded layout, as segment ids give):
    # the forward's walk ends its passes early at the tail, never inside.
    "empty_runs": (Packing((113,) + (0,) * 40 + (17, 1) + (0,) * 40, (113,) + (0,) * 40 + (300, 1) + (0,) * 40),
                   (300, 300)),
}


def cases():
  for i, (dtype, dims, mask) in enumerate(itertools.product(("bfloat16", "float16"), HEAD_DIMS, MASKS)):
    packing = list(PACKINGS)[i % len(PACKINGS)]
    layout = list(LAYOUTS)[(i + i // 3) % 3]
    yield pytest.param(dtype, dims, mask, layout, packing, id=f"{dtype}-{dims[0]}x{dims[1]}-{mask}-{layout}-{packing}")


def compiled(direction, dtype, dims):
  return (dtype, *dims) in _extension.compiled_kernels(direction)


def check(dtype, dims, mask, layout, packing, seed=0, **kwargs):
  heads, kv_heads = LAYOUTS[layout]
  p, bounds = PACKINGS[packing]
  return testing.check_kernel(jnp.dtype(dtype), *dims, *bounds, heads=heads, kv_heads=kv_heads, packing=p,
                              backward=compiled("bwd", dtype, dims), seed=seed, **MASKS[mask], **kwargs)


@pytest.mark.parametrize("dtype,dims,mask,layout,packing", list(cases()))
def test_varlen_kernel_matches_reference(dtype, dims, mask, layout, packing):
  if not compiled("fwd", dtype, dims):
    pytest.skip(f"fwd kernel {dtype} {dims} not in this build (FA3_JAX_HEAD_DIMS / FA3_JAX_DTYPES)")
  results = check(dtype, dims, mask, layout, packing, seed=hash((dtype, dims, mask, layout, packing)) % 2**31)
  names = [msg.split(":")[0] for _, msg in results]
  assert names[:2] == ["out", "lse"] and names[-1] == "uncovered rows"
  failures = [msg for ok, msg in results if not ok]
  assert not failures, failures


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rows_of_no_sequence_are_exactly_zero(dtype):
  """Gaps everywhere: sequences whose seqused is 0 or below the allotment, an empty key side, rows after
  cu_seqlens[-1]; out / dq / dk / dv there exactly 0 and lse -inf (the outputs are poisoned with NaN first)."""
  dims = (128, 128)
  if not (compiled("fwd", dtype, dims) and compiled("bwd", dtype, dims)):
    pytest.skip(f"needs the {dtype} head dim 128 kernels")
  packing = Packing((64, 200, 9, 300), (70, 0, 150, 311), used_q=(0, 130, 9, 1), used_k=(70, 0, 1, 200),
                    extra_q=77, extra_k=45)
  results = testing.check_kernel(jnp.dtype(dtype), *dims, 300, 311, heads=4, kv_heads=2, causal=True,
                                 packing=packing)
  judged = dict((msg.split(":")[0], (ok, msg)) for ok, msg in results)
  assert judged["uncovered rows"][0], judged["uncovered rows"][1]
  failures = [msg for ok, msg in results if not ok]
  assert not failures, failures


@pytest.mark.parametrize("dims", [(128, 128), (64, 64)])
def test_deterministic_varlen_backward_is_bitwise_reproducible(dims):
  if not compiled("bwd", "bfloat16", dims):
    pytest.skip(f"bwd kernel bfloat16 {dims} not in this build")
  p, (max_q, max_k) = PACKINGS["cross_seqused_gaps"]
  rng = np.random.default_rng(0)
  d, dv = dims
  q, k, v, dout = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16) for shape in
                   ((p.rows("q"), 8, d), (p.rows("k"), 2, d), (p.rows("k"), 2, dv), (p.rows("q"), 8, dv)))
  layout = dict(cu_seqlens_q=p.cu_seqlens("q"), cu_seqlens_k=p.cu_seqlens("k"), max_seqlen_q=max_q,
                max_seqlen_k=max_k, seqused_q=p.seqused("q"), seqused_k=p.seqused("k"))
  attention = lambda q, k, v: fa3_jax.flash_attn_varlen_func(q, k, v, **layout, causal=True, deterministic=True)
  grads = jax.jit(lambda q, k, v, dout: jax.vjp(attention, q, k, v)[1](dout))
  first = [np.asarray(g) for g in grads(q, k, v, dout)]
  for _ in range(99):  # 100 runs in all
    for a, b in zip(first, grads(q, k, v, dout)):
      np.testing.assert_array_equal(a, np.asarray(b))


def test_vmap_over_packings_matches_a_loop():
  """Vmapped packings run as one longer packing (cu_seqlens shifted per copy, lengths as seqused)."""
  dims = (128, 128)
  if not (compiled("fwd", "bfloat16", dims) and compiled("bwd", "bfloat16", dims)):
    pytest.skip("needs the bfloat16 head dim 128 kernels")
  packings = [((10, 0, 300), (12, 5, 300)), ((310, 0, 0), (20, 297, 0)), ((1, 1, 308), (1, 316, 0))]
  rng = np.random.default_rng(1)
  cu = lambda lengths: np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  cu_q, cu_k = (np.stack([cu(p[i]) for p in packings]) for i in (0, 1))
  q = jnp.asarray(rng.standard_normal((3, 310, 4, 128), np.float32), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((3, 317, 2, 128), np.float32), jnp.bfloat16) for _ in range(2))
  attention = lambda q, k, v, a, b: fa3_jax.flash_attn_varlen_func(q, k, v, a, b, 310, 316, causal=True,
                                                                   return_lse=True)
  loss = lambda *args: jnp.sum(attention(*args)[0].astype(jnp.float32) ** 2)
  out, lse = jax.jit(jax.vmap(attention))(q, k, v, cu_q, cu_k)
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(q, k, v, cu_q, cu_k)
  one, one_grad = jax.jit(attention), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for i in range(3):
    want_out, want_lse = one(q[i], k[i], v[i], cu_q[i], cu_k[i])
    np.testing.assert_allclose(np.asarray(out[i], np.float32), np.asarray(want_out, np.float32), atol=1e-2)
    np.testing.assert_allclose(np.asarray(lse[i]), np.asarray(want_lse), atol=1e-3)
    for g, w in zip(grads, one_grad(q[i], k[i], v[i], cu_q[i], cu_k[i])):
      np.testing.assert_allclose(np.asarray(g[i], np.float32), np.asarray(w, np.float32), atol=5e-2, rtol=2e-2)


def test_varlen_kernel_is_used_on_hopper():
  if not compiled("fwd", "bfloat16", (128, 128)):
    pytest.skip("bf16 head dim 128 kernel not in this build")
  q = jnp.zeros((100, 2, 128), jnp.bfloat16)
  cu = np.array([0, 40, 100], np.int32)
  text = jax.jit(lambda q, cu: fa3_jax.flash_attn_varlen_func(q, q, q, cu, cu, 60, 60)).lower(q, cu).as_text()
  assert "fa3_jax_fwd" in text and "with_cu_seqlens_q = true" in text

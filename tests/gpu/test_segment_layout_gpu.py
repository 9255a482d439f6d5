"""Shared segment ids on the GPU: the CUDA derivation of their packed layout (fa3_jax_segment_layout) against its XLA
definition (fa3_jax._segments.packing), equal bit for bit on random ids with padding, runs crossing the kernel's
4096-id chunks, more runs than max_segments (also in later chunks), more chunks than its scan's 1024 threads, and
ids in several runs (malformed, but both must still agree); and flash_attn_func with segment ids through the
kernels against flash_attn_varlen_func on the same documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import _ops, _segments, testing
from fa3_jax._config import SequenceLayout

pytestmark = pytest.mark.gpu


def documents(rng, b: int, s: int, mean: float, pad: float):
  """Rows of runs of lognormal lengths, each run a fresh random id, a `pad` share of them padding (-1)."""
  rows = []
  for _ in range(b):
    row = []
    while len(row) < s:
      n = max(1, int(rng.lognormal(np.log(mean), 1.0)))
      row += [-1 if rng.random() < pad else int(rng.integers(0, 2**31 - 1))] * n
    rows.append(row[:s])
  return np.array(rows, np.int32)


def random_ids(rng, b: int, s: int, alphabet: int):
  """Ids drawn independently per position from a small alphabet with padding: many short runs, ids recurring."""
  return rng.integers(-1, alphabet, size=(b, s)).astype(np.int32)


CASES = {
    "one_token": (lambda rng: documents(rng, 1, 1, 1, 0.0), 1),
    "seventeen": (lambda rng: documents(rng, 3, 17, 4, 0.2), 17),
    "crossing_chunks": (lambda rng: documents(rng, 2, 4097 * 3, 1500, 0.1), 64),
    "long_row": (lambda rng: documents(rng, 1, 70001, 5000, 0.3), 70001),
    "many_rows": (lambda rng: documents(rng, 257, 113, 20, 0.2), 8),
    "truncated": (lambda rng: documents(rng, 4, 1023, 10, 0.1), 5),
    "truncated_across_chunks": (lambda rng: documents(rng, 3, 9000, 300, 0.1), 5),
    "more_chunks_than_a_scan_tile": (lambda rng: documents(rng, 1500, 37, 8, 0.2), 6),
    "all_padding": (lambda rng: np.full((3, 239), -1, np.int32), 4),
    "recurring_ids": (lambda rng: random_ids(rng, 5, 8195, 3), 4096),
    "recurring_truncated": (lambda rng: random_ids(rng, 2, 4099, 2), 7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_derivation_equals_the_xla_definition(case):
  make, m = CASES[case]
  ids = jnp.asarray(make(np.random.default_rng(len(case))))
  want = jax.jit(lambda ids: _segments.packing(SequenceLayout(segment_ids_q=ids, max_segments=m)))(ids)

  # Freed NaN-filled memory, which the results come from next: unwritten slots would not read as the 0 lengths of
  # empty slots that fresh device memory may hold.
  testing._poison_device_memory(4 * ids.shape[0] * (2 * m + 2))
  got = jax.jit(lambda ids: _ops.segment_kernel(ids, m))(ids)
  for name in ("cu_seqlens_q", "seqused_q", "cu_seqlens_k", "seqused_k"):
    np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)


# name: (dtype, head_dim, heads, kv_heads, batch, seqlen, mean document length, options)
KERNEL_CASES = {
    "bf16_128_causal": ("bfloat16", 128, 4, 4, 3, 1023, 200, dict(causal=True)),
    "fp16_64_gqa_window": ("float16", 64, 4, 2, 2, 4097, 900, dict(window_size=(97, 31))),
    "bf16_128_short_docs": ("bfloat16", 128, 2, 1, 4, 239, 17, dict(causal=True, softcap=15.0)),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_segment_ids_run_the_varlen_kernels_on_the_same_documents(case):
  # flash_attn_func with segment ids (the CUDA derivation, then the varlen kernels) against flash_attn_varlen_func
  # on the documents packed by hand (whose kernels test_varlen_gpu.py checks against the reference): the same
  # per-document arithmetic, so with deterministic=True every real row is equal bit for bit, and padding gets 0.
  dtype, d, h, hk, b, s, mean, options = KERNEL_CASES[case]
  if not all(fa3_jax.kernel_available(dtype, d, direction=way) for way in ("fwd", "bwd")):
    # The reference path computes the two layouts differently (dense masking vs per document): no bitwise match.
    pytest.skip(f"{dtype} head dim {d} kernels not in this build (FA3_JAX_HEAD_DIMS / FA3_JAX_DTYPES)")
  rng = np.random.default_rng(7)
  ids = documents(rng, b, s, mean, 0.15)
  q, k, v, dout = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                   for shape in ((b, s, h, d), (b, s, hk, d), (b, s, hk, d), (b, s, h, d)))
  options = dict(options, deterministic=True)

  def segmented(q, k, v):
    return fa3_jax.flash_attn_func(q, k, v, q_segment_ids=ids, return_lse=True, **options)

  (out, lse), vjp = jax.vjp(segmented, q, k, v)
  grads = vjp((dout, jnp.zeros_like(lse)))
  docs = [(row, np.flatnonzero(ids[row] == x)) for row in range(b) for x in np.unique(ids[row][ids[row] >= 0])]
  pack = lambda x: jnp.concatenate([x[row, pos] for row, pos in docs])
  cu = np.concatenate([[0], np.cumsum([len(pos) for _, pos in docs])]).astype(np.int32)
  longest = max(len(pos) for _, pos in docs)

  def varlen(q, k, v):
    return fa3_jax.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, return_lse=True, **options)

  (want_out, want_lse), want_vjp = jax.vjp(varlen, pack(q), pack(k), pack(v))
  want_grads = want_vjp((pack(dout), jnp.zeros_like(want_lse)))
  np.testing.assert_array_equal(pack(out), want_out)
  np.testing.assert_array_equal(jnp.concatenate([lse[row][:, pos] for row, pos in docs], axis=1), want_lse)
  for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
    np.testing.assert_array_equal(pack(g), w, err_msg=name)
  padding = ids < 0
  assert not np.asarray(out)[padding].any() and np.isneginf(np.asarray(lse).transpose(0, 2, 1)[padding]).all()
  assert all(not np.asarray(g)[padding].any() for g in grads)

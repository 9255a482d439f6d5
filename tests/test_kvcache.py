"""flash_attn_with_kvcache on the reference path against a NumPy oracle that writes the cache, rotates and attends
sequence by sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax import testing


def _rotate(x, pos, cos, sin, interleaved):
  """x (rows, heads, d) turned at positions pos (rows,) by complex multiplication, float64."""
  half = cos.shape[1]
  x = x.astype(np.float64).copy()
  turn = (cos[pos] + 1j * sin[pos])[:, None, :]
  if interleaved:
    z = (x[..., 0:2 * half:2] + 1j * x[..., 1:2 * half:2]) * turn
    x[..., 0:2 * half:2], x[..., 1:2 * half:2] = z.real, z.imag
  else:
    z = (x[..., :half] + 1j * x[..., half:2 * half]) * turn
    x[..., :half], x[..., half:2 * half] = z.real, z.imag
  return x


def _oracle(q, kc, vc, k, v, seqlens, leftpad, batch_idx, page_table, causal, window, cos, sin, interleaved):
  """(out, lse, k_cache, v_cache) in float64 / the caches' dtype."""
  kc, vc = kc.copy(), vc.copy()
  b, sq, h, d = q.shape
  hk = kc.shape[2]
  outs, lses = np.zeros((b, sq, h, vc.shape[-1])), np.full((b, h, sq), -np.inf)
  for i in range(b):
    snew = 0 if k is None else k.shape[1]
    if page_table is None:
      rows = lambda pos: (batch_idx[i] if batch_idx is not None else i, pos)
    else:
      rows = lambda pos: (page_table[i, pos // kc.shape[1]], pos % kc.shape[1])
    if k is not None:
      kn = k[i].astype(np.float64)
      if cos is not None:
        kn = _rotate(kn, seqlens[i] + np.arange(snew), cos, sin, interleaved)
      for r in range(snew):
        kc[rows(seqlens[i] + r)] = kn[r].astype(kc.dtype)
        vc[rows(seqlens[i] + r)] = v[i, r]
    length = seqlens[i] + snew
    lp = 0 if leftpad is None else leftpad[i]
    keys = np.array([kc[rows(p)] for p in range(lp, length)], np.float64).reshape(-1, hk, d)
    vals = np.array([vc[rows(p)] for p in range(lp, length)], np.float64).reshape(-1, hk, vc.shape[-1])
    qi = q[i].astype(np.float64)
    if cos is not None:
      qpos = seqlens[i] + (np.arange(sq) if causal or window != (-1, -1) else np.zeros(sq, int))
      qi = _rotate(qi, qpos, cos, sin, interleaved)
    kpos = np.arange(lp, length)
    qrow = length - sq + np.arange(sq)  # query positions, bottom-right aligned
    vis = np.ones((sq, length - lp), bool)
    left, right = window if not causal else (window[0], 0)
    if right >= 0:
      vis &= kpos[None, :] <= qrow[:, None] + right
    if left >= 0:
      vis &= kpos[None, :] >= qrow[:, None] - left
    for hh in range(h):
      s = qi[:, hh] @ keys[:, hh // (h // hk)].T / np.sqrt(d)
      s = np.where(vis, s, -np.inf)
      top = np.max(s, axis=1, keepdims=True, initial=-np.inf)
      p = np.where(vis, np.exp(s - np.where(np.isfinite(top), top, 0)), 0)
      z = p.sum(1)
      outs[i, :, hh] = (p / np.where(z > 0, z, 1)[:, None]) @ vals[:, hh // (h // hk)]
      lses[i, hh] = np.where(z > 0, np.log(np.where(z > 0, z, 1)) + np.where(np.isfinite(top[:, 0]), top[:, 0], 0),
                             -np.inf)
  return outs, lses, kc, vc


CASES = {
    "contiguous": dict(),
    "contiguous append 5 causal": dict(snew=5, sq=5, causal=True),
    "append 1 rotary interleaved": dict(snew=1, sq=1, rotary=True, interleaved=True),
    "append 5 q 4 rotary halves causal": dict(snew=5, sq=4, rotary=True, interleaved=False, causal=True),
    "batch idx leftpad window": dict(snew=3, sq=2, batch_idx=True, leftpad=True, window=(6, 0)),
    "paged 16": dict(page=16, snew=5, sq=5, causal=True),
    "paged 1 rotary": dict(page=1, snew=1, sq=1, rotary=True, interleaved=False),
    "paged 4 leftpad softcap-free mqa": dict(page=4, snew=2, sq=4, leftpad=True, hk=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kvcache_matches_oracle(case):
  c = CASES[case]
  rng = np.random.default_rng(abs(hash(case)) % 2**32)
  b, h, hk, d, cap = 3, 4, c.get("hk", 2), 16, 48
  sq, snew = c.get("sq", 3), c.get("snew", 0)
  seqlens = np.array([0, 17, cap - snew], np.int32)
  page = c.get("page")
  if page:
    pages = cap // page
    page_table = rng.permutation(b * pages + 3)[: b * pages].reshape(b, pages).astype(np.int32)
    kc = rng.standard_normal((b * pages + 3, page, hk, d)).astype(jnp.bfloat16)
  else:
    page_table = None
    kc = rng.standard_normal((b + 2 if c.get("batch_idx") else b, cap, hk, d)).astype(jnp.bfloat16)
  vc = rng.standard_normal(kc.shape).astype(jnp.bfloat16)
  q = rng.standard_normal((b, sq, h, d)).astype(jnp.bfloat16)
  k = rng.standard_normal((b, snew, hk, d)).astype(jnp.bfloat16) if snew else None
  v = rng.standard_normal((b, snew, hk, d)).astype(jnp.bfloat16) if snew else None
  batch_idx = np.array([4, 0, 2], np.int32) if c.get("batch_idx") else None
  leftpad = np.minimum(np.array([0, 5, 9], np.int32), seqlens) if c.get("leftpad") else None
  cos = sin = None
  if c.get("rotary"):
    ang = rng.uniform(0, 6, (cap, 6))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
  causal, window = c.get("causal", False), c.get("window", (-1, -1))
  got = fa3_jax.flash_attn_with_kvcache(
      q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=jnp.asarray(seqlens),
      cache_batch_idx=batch_idx, cache_leftpad=leftpad, page_table=page_table, causal=causal, window_size=window,
      rotary_interleaved=c.get("interleaved", True), return_lse=True)
  want = _oracle(q, kc, vc, k, v, seqlens, leftpad, batch_idx, page_table, causal, window, cos, sin,
                 c.get("interleaved", True))
  out, lse = np.asarray(got[0], np.float64), np.asarray(got[1])
  np.testing.assert_allclose(out, want[0], atol=2e-2)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want[1]))
  np.testing.assert_allclose(lse[np.isfinite(lse)], want[1][np.isfinite(want[1])], atol=2e-2)
  if snew:
    # Every written row is right and every other row bitwise unchanged.
    np.testing.assert_array_equal(np.asarray(got[2]).view(np.uint16), want[2].view(np.uint16))
    np.testing.assert_array_equal(np.asarray(got[3]).view(np.uint16), want[3].view(np.uint16))
  else:
    assert len(got) == 2


@pytest.mark.parametrize("seqlen_q,kwargs", [(1, dict(causal=True)), (3, dict()), (5, dict(softcap=8.0))])
def test_gqa_packing_and_splits_do_not_change_results(seqlen_q, kwargs):
  rng = np.random.default_rng(seqlen_q)
  q = jnp.asarray(rng.standard_normal((2, seqlen_q, 8, 32)), jnp.bfloat16)
  kc, vc = (jnp.asarray(rng.standard_normal((2, 96, 2, 32)), jnp.bfloat16) for _ in range(2))
  lens = jnp.asarray([0, 77], jnp.int32)
  call = lambda **more: fa3_jax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_lse=True, **kwargs,
                                                        **more)
  want = call(pack_gqa=False, num_splits=1)
  for more in (dict(pack_gqa=True), dict(pack_gqa=None, num_splits=3)):
    got = call(**more)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=1e-2)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5)


def test_kvcache_update_in_place_when_donated():
  b, cap, hk, d = 2, 4096, 2, 64
  kc = jnp.zeros((b, cap, hk, d), jnp.bfloat16) + 1
  vc = jnp.zeros((b, cap, hk, d), jnp.bfloat16) + 2
  q = jnp.ones((b, 1, 4, d), jnp.bfloat16)
  knew = jnp.full((b, 1, hk, d), 3, jnp.bfloat16)

  def step(kc, vc, q, knew, lens):
    out, kc, vc = fa3_jax.flash_attn_with_kvcache(q, kc, vc, knew, knew, cache_seqlens=lens)
    return out, kc, vc

  f = jax.jit(step, donate_argnums=(0, 1))
  lens = jnp.array([5, 100], jnp.int32)
  compiled = f.lower(kc, vc, q, knew, lens).compile()
  text = compiled.as_text()
  assert "input_output_alias" in text or "may-alias" in text or "must-alias" in text
  ptr = kc.unsafe_buffer_pointer()
  out, kc2, vc2 = f(kc, vc, q, knew, lens)
  assert kc2.unsafe_buffer_pointer() == ptr
  assert float(kc2[1, 100, 0, 0]) == 3 and float(kc2[1, 101, 0, 0]) == 1


def test_kvcache_is_forward_only_and_checks_arguments():
  q = jnp.ones((1, 1, 2, 16), jnp.bfloat16)
  kc = jnp.ones((1, 8, 1, 16), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda q: fa3_jax.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=3).astype(jnp.float32).sum())(q)
  with pytest.raises(ValueError, match="cache_seqlens must lie in"):
    fa3_jax.flash_attn_with_kvcache(q, kc, kc, kc[:, :2], kc[:, :2], cache_seqlens=7)
  with pytest.raises(ValueError, match="pass cache_seqlens"):
    fa3_jax.flash_attn_with_kvcache(q, kc, kc, kc[:, :1], kc[:, :1])
  with pytest.raises(ValueError, match="k and v"):
    fa3_jax.flash_attn_with_kvcache(q, kc, kc, kc[:, :1], None, cache_seqlens=1)
  with pytest.raises(TypeError, match="k_cache must have q's dtype"):
    fa3_jax.flash_attn_with_kvcache(q, kc.astype(jnp.float16), kc, cache_seqlens=1)
  with pytest.raises(ValueError, match="page_table entries"):
    fa3_jax.flash_attn_with_kvcache(q, kc, kc, page_table=np.array([[1]], np.int32), cache_seqlens=1)


def test_kvcache_under_jit_and_vmap_equals_eager():
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.standard_normal((2, 2, 1, 4, 16)), jnp.bfloat16)  # (copies, batch, seqlen_q, heads, d)
  kc = jnp.asarray(rng.standard_normal((2, 2, 32, 2, 16)), jnp.bfloat16)
  kn = jnp.asarray(rng.standard_normal((2, 2, 1, 2, 16)), jnp.bfloat16)
  lens = jnp.asarray([[3, 31], [0, 9]], jnp.int32)
  f = lambda q, kc, kn, n: fa3_jax.flash_attn_with_kvcache(q, kc, kc, kn, kn, cache_seqlens=n, causal=True)
  got = jax.jit(jax.vmap(f))(q, kc, kn, lens)
  for i in range(2):
    want = f(q[i], kc[i], kn[i], lens[i])
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g[i], np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("batched", ["all", "q only"])
def test_paged_kvcache_under_vmap_equals_each_copy(batched):
  # Copies with their own pages and tables fold into one call whose tables point into the merged pages
  # (fold_sequences); with only q batched, the copies share the pages and fold into the query heads.
  rng = np.random.default_rng(8)
  n, b, page, pages, hk, d = 2, 3, 4, 5, 2, 16
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q = normal(n, b, 1, 4, d)
  kc, vc = normal(n, b * pages + 1, page, hk, d), normal(n, b * pages + 1, page, hk, d)
  table = jnp.asarray(np.stack([rng.permutation(b * pages + 1)[: b * pages].reshape(b, pages) for _ in range(n)]),
                      jnp.int32)
  lens = jnp.asarray(rng.integers(0, b * page, (n, b)), jnp.int32)
  f = lambda q, kc, vc, t, lens: fa3_jax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, page_table=t,
                                                                 return_lse=True)
  axes = (0, 0, 0, 0, 0) if batched == "all" else (0, None, None, None, None)
  args = (q, kc, vc, table, lens) if batched == "all" else (q, kc[0], vc[0], table[0], lens[0])
  got = jax.jit(jax.vmap(f, in_axes=axes))(*args)
  for i in range(n):
    want = f(*(a[i] if ax == 0 else a for a, ax in zip(args, axes)))
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g[i], np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_sharding_has_no_collectives_and_matches_unsharded(paged, mode):
  # A decode step (append one token, attend) with the heads over tp = 4, and for a contiguous cache the batch over
  # dp = 2. (Pages are shared by all sequences: a batch-sharded step would send its new rows to every replica of
  # the pages, so a paged cache shards with the heads.) No device talks to another.
  mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(mode,) * 2)
  rng = np.random.default_rng(11)
  b, cap, h, hk, d = 4, 64, 8, 4, 16
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q, knew, vnew = normal(b, 1, h, d), normal(b, 1, hk, d), normal(b, 1, hk, d)
  lens = jnp.asarray([0, 17, 40, 63], jnp.int32)
  if paged:
    page = 16
    kc, vc = normal(b * cap // page, page, hk, d), normal(b * cap // page, page, hk, d)
    table = jnp.asarray(rng.permutation(b * cap // page).reshape(b, cap // page), jnp.int32)
    batch, cache_spec, table_arg = None, P(None, None, "tp"), dict(page_table=table)
  else:
    kc, vc = normal(b, cap, hk, d), normal(b, cap, hk, d)
    batch, cache_spec, table_arg = "dp", P("dp", None, "tp"), {}

  def step(q, kc, vc, knew, vnew, lens):
    return fa3_jax.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, causal=True, **table_arg)

  want = jax.jit(step)(q, kc, vc, knew, vnew, lens)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  rows = P(batch, None, "tp")
  args = (put(q, rows), put(kc, cache_spec), put(vc, cache_spec), put(knew, rows), put(vnew, rows),
          put(lens, P(batch)))
  f = jax.jit(step)
  hlo = f.lower(*args).compile().as_text()
  found = testing.collectives(hlo)
  assert sum(found.values()) == 0, found
  got = f(*args)
  assert got[0].sharding.spec[0] == batch and got[0].sharding.spec[2] == "tp"
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))

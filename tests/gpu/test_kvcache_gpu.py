"""flash_attn_with_kvcache on our kernels: the attention it runs over each cache layout (contiguous with seqused_k,
cache_leftpad's packed keys, cache_batch_idx and paged gathers, appends, rotary), unsplit and split (forced and
chosen split-KV counts, chunks without keys), against the float32 reference with the FA3 tolerance rule, on fresh
random caches with awkward lengths; and the donated update in place on the GPU.

The cache update and rotary are the same Python on every backend and are checked against a NumPy oracle in
tests/test_kvcache.py; here each call records the attention operands it hands to the kernel (q after rotary, the keys
view, the sequence layout) so that the reference and the same-precision baseline see exactly those.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import _extension, kvcache, reference, testing

pytestmark = pytest.mark.gpu

SEQLENS = (0, 1, 17, 113, 239, 1023)  # valid keys per sequence before the append
CAPACITY = 1280

# name: (dtype, head_dim, heads, kv_heads, seqlen_q, seqlen_new, page_size or None, options); options.splits is
# num_splits (default 0: chosen, which splits every case below with a short batch).
CASES = {
    "decode append 1 causal": ("bfloat16", 128, 8, 2, 1, 1, None, dict(causal=True)),
    "decode full cache no append": ("bfloat16", 128, 8, 2, 1, 0, None, dict(full=True)),
    "speculative 4 rotary interleaved": ("bfloat16", 128, 8, 2, 4, 4, None, dict(causal=True, rotary=True)),
    "chunk 113 rotary halves": ("bfloat16", 128, 8, 2, 113, 113, None,
                                dict(causal=True, rotary=True, interleaved=False)),
    "batch idx leftpad window": ("bfloat16", 128, 8, 2, 2, 2, None,
                                 dict(batch_idx=True, leftpad=True, window_size=(256, 0))),
    "paged 256 decode": ("bfloat16", 128, 8, 2, 1, 1, 256, dict(causal=True)),
    "paged 16 softcap": ("bfloat16", 128, 8, 2, 3, 3, 16, dict(causal=True, softcap=15.0)),
    "paged 1 leftpad mqa d64": ("bfloat16", 64, 4, 1, 2, 1, 1, dict(leftpad=True, causal=True)),
    "fp16 non-causal 17 queries": ("float16", 128, 8, 8, 17, 0, None, dict()),
    "decode unsplit": ("bfloat16", 128, 8, 2, 1, 1, None, dict(causal=True, splits=1)),
    "decode 3 splits local": ("bfloat16", 128, 8, 2, 1, 1, None, dict(window_size=(300, 0), splits=3)),
    "decode 16 splits leftpad": ("bfloat16", 128, 8, 2, 1, 1, None, dict(leftpad=True, causal=True, splits=16)),
    "paged 256 16 splits softcap": ("bfloat16", 128, 8, 2, 1, 1, 256, dict(softcap=20.0, splits=16)),
    "d256 3 splits": ("bfloat16", 256, 4, 2, 2, 2, None, dict(causal=True, splits=3)),
    "d64 16 splits mqa": ("bfloat16", 64, 8, 1, 4, 0, None, dict(splits=16)),
    "long 65537 chosen splits": ("bfloat16", 128, 32, 8, 1, 1, None, dict(causal=True, seqlens=(65536, 4096),
                                                                       capacity=65537)),
    "paged 64 append 5 rotary": ("bfloat16", 128, 8, 2, 5, 5, 64, dict(causal=True, rotary=True,
                                                                      seqlens=(0, 1, 255, 4097, 17),
                                                                      capacity=4160)),
    "paged 64 4 queries append 1 gqa d64": ("bfloat16", 64, 8, 2, 4, 1, 64, dict(causal=True, splits=3)),
    "d256 mha local softcap append 5": ("bfloat16", 256, 4, 4, 5, 5, None,
                                        dict(window_size=(100, 0), softcap=10.0, seqlens=(255, 4097, 1),
                                             capacity=4160)),
    "d64 mqa paged 16 local": ("bfloat16", 64, 8, 1, 1, 1, 16, dict(window_size=(64, 0), splits=16)),
    "fp16 d128 gqa append 1": ("float16", 128, 8, 2, 1, 1, None, dict(causal=True)),
}


def compiled(dtype, d):
  return (dtype, d, d) in _extension.compiled_kernels("fwd")


def make_call(case, seed=0):
  """(args, kwargs) of a flash_attn_with_kvcache call for CASES[case], on host arrays."""
  dtype, d, h, hk, sq, snew, page, opt = CASES[case]
  rng = np.random.default_rng(seed)
  capacity = opt.get("capacity", CAPACITY)
  seqlens = np.minimum(np.asarray(opt.get("seqlens", SEQLENS), np.int32), capacity - snew)
  b = len(seqlens)
  normal = lambda *shape: rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype))
  kwargs = dict(causal=opt.get("causal", False), window_size=opt.get("window_size", (-1, -1)),
                softcap=opt.get("softcap", 0.0), num_splits=opt.get("splits", 0), return_lse=True)
  if not opt.get("full"):
    kwargs["cache_seqlens"] = seqlens
  if page:
    pages = capacity // page
    kwargs["page_table"] = rng.permutation(b * pages + 5)[: b * pages].reshape(b, pages).astype(np.int32)
    cache_shape = (b * pages + 5, page, hk, d)
  else:
    cache_shape = (b + 3 if opt.get("batch_idx") else b, capacity, hk, d)
  if opt.get("batch_idx"):
    kwargs["cache_batch_idx"] = rng.permutation(b + 3)[:b].astype(np.int32)
  if opt.get("leftpad"):
    kwargs["cache_leftpad"] = np.minimum(np.array([0, 1, 5, 100, 17, 3][:b], np.int32), seqlens)
  if opt.get("rotary"):
    angle = rng.uniform(0, 2 * np.pi, (capacity, d // 4)).astype(np.float32)  # rotary_dim = head_dim / 2
    kwargs.update(rotary_cos=np.cos(angle), rotary_sin=np.sin(angle),
                  rotary_interleaved=opt.get("interleaved", True))
  q = normal(b, sq, h, d)
  if opt.get("softcap"):
    q = (q.astype(np.float32) * np.float32(opt["softcap"] / 4)).astype(q.dtype)  # make the cap bite
  new = (normal(b, snew, hk, d), normal(b, snew, hk, d)) if snew else (None, None)
  return (q, normal(*cache_shape), normal(*cache_shape), *new), kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_kvcache_attention_matches_reference(case, monkeypatch):
  dtype, d = CASES[case][:2]
  if not compiled(dtype, d):
    pytest.skip(f"fwd kernel {dtype} {d}x{d} not in this build")
  args, kwargs = make_call(case)
  operands = []
  forward = kvcache._forward_only

  def recording(cfg, q, k, v, sequences):  # the kernel's operands and results (GQA-packed where the call packs)
    result = forward(cfg, q, k, v, sequences)
    operands.append((cfg, q, k, v, sequences, result))
    return result

  monkeypatch.setattr(kvcache, "_forward_only", recording)
  testing._poison_device_memory(1 << 30)
  fa3_jax.flash_attn_with_kvcache(*map(jax.device_put, [x for x in args if x is not None]), **{
      key: jax.device_put(x) if isinstance(x, np.ndarray) else x for key, x in kwargs.items()})
  (cfg, q, k, v, sequences, (out, lse)), = operands
  assert cfg.num_splits == CASES[case][-1].get("splits", cfg.num_splits) and cfg.num_splits >= 1
  with jax.default_matmul_precision("highest"):
    ref_out, ref_lse = reference.varlen_forward(*(x.astype(jnp.float32) for x in (q, k, v)), cfg, sequences)
  baseline = testing.same_precision_attention(q, k, v, cfg, sequences)
  passed, message = testing.fa3_check("out", out, ref_out, baseline, softcap=cfg.softcap > 0)
  assert passed, message
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(ref_lse)
  assert np.max(np.abs(lse[finite] - ref_lse[finite]), initial=0.0) <= 1e-3


def test_donated_decode_step_updates_the_cache_in_place_and_runs_the_kernel():
  case = "paged 256 decode"
  if not compiled("bfloat16", 128):
    pytest.skip("fwd kernel bfloat16 128x128 not in this build")
  (q, k_cache, v_cache, k, v), kwargs = make_call(case, seed=1)
  kwargs = {key: jnp.asarray(x) if isinstance(x, np.ndarray) else x for key, x in kwargs.items()}
  step = lambda k_cache, v_cache, q, k, v: fa3_jax.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kwargs)
  want = step(*map(jnp.asarray, (k_cache, v_cache, q, k, v)))
  donated = jax.jit(step, donate_argnums=(0, 1))
  assert "fa3_jax_fwd" in donated.lower(k_cache, v_cache, q, k, v).as_text()
  k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
  pointers = k_cache.unsafe_buffer_pointer(), v_cache.unsafe_buffer_pointer()
  got = donated(k_cache, v_cache, q, k, v)
  assert (got[2].unsafe_buffer_pointer(), got[3].unsafe_buffer_pointer()) == pointers
  for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
  # Element by element: each new row at its page and row, every other row bitwise as before.
  (_, k_before, v_before, k_new, v_new), _ = make_call(case, seed=1)
  table, lens = kwargs["page_table"], np.asarray(kwargs["cache_seqlens"])
  page = k_before.shape[1]
  for name, before, new, after in (("k_cache", k_before, k_new, got[2]), ("v_cache", v_before, v_new, got[3])):
    expected = before.copy()
    for b in range(new.shape[0]):
      for r in range(new.shape[1]):
        pos = lens[b] + r
        expected[int(table[b, pos // page]), pos % page] = new[b, r]
    np.testing.assert_array_equal(np.asarray(after).view(np.uint16), expected.view(np.uint16), err_msg=name)

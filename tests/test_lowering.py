"""Lowering for the cuda platform on a CPU-only machine: our custom calls, operands and attributes appear in the
StableHLO text (the part of the kernel path that can be checked without a GPU)."""

import re

import jax
import jax.numpy as jnp
import pytest

import fa3_jax
from fa3_jax import _extension

ALL_KERNELS = frozenset((t, d, dv) for t in ("bfloat16", "float16")
                        for d, dv in ((64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)))


@pytest.fixture
def kernels_compiled(monkeypatch):
  """Pretend every kernel was built, so the public API takes its CUDA branch when lowered for cuda."""
  monkeypatch.setattr(_extension, "compiled_kernels", lambda direction: ALL_KERNELS)


def cuda_stablehlo(f, *args):
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  return jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


def inputs(b=2, sq=100, sk=130, h=8, hk=2, d=128, dv=None, dtype=jnp.bfloat16):
  dv = d if dv is None else dv
  return (jnp.zeros((b, sq, h, d), dtype), jnp.zeros((b, sk, hk, d), dtype), jnp.zeros((b, sk, hk, dv), dtype))


def custom_calls(text, target):
  return re.findall(rf"stablehlo.custom_call @{target}\((.*)", text)


def test_forward_custom_call_and_attributes(kernels_compiled):
  text = cuda_stablehlo(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, softcap=30.0,
                                                                softmax_scale=0.125), *inputs())
  (call,) = custom_calls(text, "fa3_jax_fwd")
  assert "softmax_scale = 1.250000e-01 : f32" in call
  assert "softcap = 3.000000e+01 : f32" in call
  # causal, unbounded left: resolved to integers, left = seqlen_k, right = 0.
  assert "window_left = 130 : i64" in call and "window_right = 0 : i64" in call
  assert "tensor<2x100x8x128xbf16>, tensor<2x130x2x128xbf16>, tensor<2x130x2x128xbf16>" in call
  assert "tensor<2x100x8x128xbf16>, tensor<2x8x100xf32>" in call
  assert "num_splits = 1 : i64" in call
  assert "fa3_jax_bwd" not in text


def test_backward_custom_calls_and_attributes(kernels_compiled):
  q, k, v = inputs(sq=64, sk=64, d=64)
  loss = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, window_size=(32, 8), deterministic=True).sum()
  text = cuda_stablehlo(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  assert len(custom_calls(text, "fa3_jax_fwd")) == 1
  (call,) = custom_calls(text, "fa3_jax_bwd")
  assert "deterministic = true" in call
  assert "window_left = 32 : i64" in call and "window_right = 8 : i64" in call
  assert "softmax_scale = 1.250000e-01 : f32" in call and "softcap = 0.000000e+00 : f32" in call
  # operands dout, q, k, v, out, lse; results dq, dk, dv (+ workspace)
  assert ("tensor<2x64x8x64xbf16>, tensor<2x64x8x64xbf16>, tensor<2x64x2x64xbf16>, tensor<2x64x2x64xbf16>, "
          "tensor<2x64x8x64xbf16>, tensor<2x8x64xf32>") in call


def test_unbounded_window_resolves_to_sequence_lengths(kernels_compiled):
  text = cuda_stablehlo(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v), *inputs(sq=7, sk=300))
  (call,) = custom_calls(text, "fa3_jax_fwd")
  assert "window_left = 300 : i64" in call and "window_right = 7 : i64" in call


def test_uncompiled_head_dim_is_zero_padded_to_next_kernel(kernels_compiled):
  text = cuda_stablehlo(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v), *inputs(d=72, dtype=jnp.float16))
  (call,) = custom_calls(text, "fa3_jax_fwd")
  assert "tensor<2x100x8x96xf16>, tensor<2x130x2x96xf16>, tensor<2x130x2x96xf16>" in call
  assert "softmax_scale = 0.117851131 : f32" in call  # 1/sqrt(72): the scale of the real head dim


def test_vmap_over_q_folds_into_heads_without_copying_kv(kernels_compiled):
  q, k, v = inputs(b=1, sq=16, sk=16, h=4, hk=2, d=64)
  fn = jax.vmap(lambda q: fa3_jax.flash_attn_func(q, k, v))
  text = cuda_stablehlo(fn, jnp.stack([q, q, q]))
  (call,) = custom_calls(text, "fa3_jax_fwd")
  assert "tensor<1x16x12x64xbf16>, tensor<1x16x2x64xbf16>" in call
  assert "broadcast_in_dim" not in text


def test_vmap_over_all_folds_into_batch(kernels_compiled):
  q, k, v = inputs(b=2, sq=16, sk=16, h=4, hk=2, d=64)
  stack = lambda x: jnp.stack([x] * 3)
  text = cuda_stablehlo(jax.vmap(fa3_jax.flash_attn_func), stack(q), stack(k), stack(v))
  (call,) = custom_calls(text, "fa3_jax_fwd")
  assert "tensor<6x16x4x64xbf16>, tensor<6x16x2x64xbf16>" in call


def test_without_kernels_cuda_lowering_uses_the_reference():
  if _extension.compiled_kernels("fwd"):
    pytest.skip("this build has kernels; the reference-only branch is what CPU-only builds exercise")
  text = cuda_stablehlo(fa3_jax.flash_attn_func, *inputs())
  assert "custom_call @fa3_jax" not in text


def test_multi_platform_lowering_has_both_branches(kernels_compiled):
  q, k, v = inputs(sq=16, sk=16, d=64)
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)]
  text = jax.jit(fa3_jax.flash_attn_func).trace(*avals).lower(lowering_platforms=("cuda", "cpu")).as_text()
  assert len(custom_calls(text, "fa3_jax_fwd")) == 1
  assert "stablehlo.case" in text or "stablehlo.if" in text  # platform index switch; cpu runs the reference


def test_vmap_of_grad_traces_through_both_kernels(kernels_compiled):
  q, k, v = inputs(b=1, sq=16, sk=16, h=4, hk=2, d=64)
  loss = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True).astype(jnp.float32).sum()
  stack = lambda x: jnp.stack([x] * 3)
  text = cuda_stablehlo(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))), stack(q), stack(k), stack(v))
  (fwd,) = custom_calls(text, "fa3_jax_fwd")
  (bwd,) = custom_calls(text, "fa3_jax_bwd")
  assert "tensor<3x16x4x64xbf16>" in fwd and "tensor<3x16x2x64xbf16>" in bwd


# ---- variable-length (packed) calls: the sequence-layout operands and attributes -------------------------------

def varlen_inputs(total_q=100, total_k=130, h=8, hk=2, d=128, batch=3):
  cu = jnp.zeros((batch + 1,), jnp.int32)
  return (jnp.zeros((total_q, h, d), jnp.bfloat16), jnp.zeros((total_k, hk, d), jnp.bfloat16),
          jnp.zeros((total_k, hk, d), jnp.bfloat16), cu, cu)


def signature(call):
  """The custom call's '(operand types) -> (result types)', the workspace's size left out (0 without the extension)."""
  return re.sub(r"tensor<\d+xui8>", "tensor<?xui8>", call.rsplit("} : ", 1)[1])


def varlen(q, k, v, cu_q, cu_k, **kwargs):
  return fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 60, 70, **kwargs)


def test_varlen_forward_announces_the_sequence_layout(kernels_compiled):
  used = jnp.zeros((3,), jnp.int32)
  text = cuda_stablehlo(lambda q, k, v, a, b, u: varlen(q, k, v, a, b, seqused_k=u, causal=True),
                        *varlen_inputs(), used)
  (call,) = custom_calls(text, "fa3_jax_fwd")
  for flag in ("with_cu_seqlens_q = true", "with_cu_seqlens_k = true", "with_seqused_q = false",
               "with_seqused_k = true", "max_seqlen_q = 60 : i64", "max_seqlen_k = 70 : i64"):
    assert flag in call
  # causal, unbounded left: resolved with the bounds, left = max_seqlen_k.
  assert "window_left = 70 : i64" in call and "window_right = 0 : i64" in call
  assert signature(call).startswith(
      "(tensor<100x8x128xbf16>, tensor<130x2x128xbf16>, tensor<130x2x128xbf16>, tensor<4xi32>, tensor<4xi32>, "
      "tensor<3xi32>) -> (tensor<100x8x128xbf16>, tensor<8x100xf32>, tensor<?xui8>)")


def test_varlen_backward_operands_with_lse_cotangent(kernels_compiled):
  def loss(q, k, v, a, b):
    out, lse = varlen(q, k, v, a, b, deterministic=True, return_lse=True)
    return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

  text = cuda_stablehlo(jax.grad(loss, argnums=(0, 1, 2)), *varlen_inputs())
  assert len(custom_calls(text, "fa3_jax_fwd")) == 1
  (call,) = custom_calls(text, "fa3_jax_bwd")
  for flag in ("with_dlse = true", "with_cu_seqlens_q = true", "with_cu_seqlens_k = true", "with_seqused_q = false",
               "with_seqused_k = false", "deterministic = true", "max_seqlen_q = 60 : i64", "max_seqlen_k = 70 : i64",
               "window_left = 70 : i64", "window_right = 60 : i64"):
    assert flag in call
  # dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k -> dq, dk, dv, workspace
  q, kv = "tensor<100x8x128xbf16>", "tensor<130x2x128xbf16>"
  assert signature(call).startswith(f"({q}, {q}, {kv}, {kv}, {q}, tensor<8x100xf32>, tensor<8x100xf32>, "
                                    f"tensor<4xi32>, tensor<4xi32>) -> ({q}, {kv}, {kv}, tensor<?xui8>)")


def test_varlen_head_dim_is_zero_padded_like_the_dense_call(kernels_compiled):
  q, k, v, cu_q, cu_k = varlen_inputs(d=72)
  (call,) = custom_calls(cuda_stablehlo(varlen, q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
                                        cu_q, cu_k), "fa3_jax_fwd")
  assert signature(call).startswith("(tensor<100x8x96xf16>, tensor<130x2x96xf16>, tensor<130x2x96xf16>")


def test_varlen_vmap_over_everything_folds_into_one_packing(kernels_compiled):
  stack = lambda x: jnp.stack([x] * 3)
  loss = lambda *a: varlen(*a, causal=True).astype(jnp.float32).sum()
  text = cuda_stablehlo(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))), *(stack(x) for x in varlen_inputs()))
  (fwd,) = custom_calls(text, "fa3_jax_fwd")
  (bwd,) = custom_calls(text, "fa3_jax_bwd")
  # 3 copies of 3 sequences: one packing of 9, the lengths explicit as seqused.
  assert signature(fwd).startswith("(tensor<300x8x128xbf16>, tensor<390x2x128xbf16>, tensor<390x2x128xbf16>, "
                                   "tensor<10xi32>, tensor<10xi32>, tensor<9xi32>, tensor<9xi32>) -> "
                                   "(tensor<300x8x128xbf16>, tensor<8x300xf32>")
  assert "with_seqused_q = true" in fwd and "with_seqused_k = true" in bwd
  assert "tensor<8x300xf32>, tensor<10xi32>, tensor<10xi32>, tensor<9xi32>, tensor<9xi32>) ->" in bwd


def test_varlen_vmap_over_q_folds_into_heads(kernels_compiled):
  q, k, v, cu_q, cu_k = varlen_inputs()
  text = cuda_stablehlo(jax.vmap(lambda q: varlen(q, k, v, cu_q, cu_k)), jnp.stack([q] * 3))
  (call,) = custom_calls(text, "fa3_jax_fwd")
  assert signature(call).startswith("(tensor<100x24x128xbf16>, tensor<130x2x128xbf16>, tensor<130x2x128xbf16>, "
                                    "tensor<4xi32>, tensor<4xi32>) -> (tensor<100x24x128xbf16>, tensor<24x100xf32>")


def test_varlen_remat_policy_keeps_one_forward(kernels_compiled):
  loss = lambda *a: varlen(*a).astype(jnp.float32).sum()
  policy = jax.checkpoint_policies.save_only_these_names("fa3_out", "fa3_lse")
  saved = cuda_stablehlo(jax.value_and_grad(jax.checkpoint(loss, policy=policy)), *varlen_inputs())
  recomputed = cuda_stablehlo(jax.value_and_grad(jax.checkpoint(loss)), *varlen_inputs())
  assert len(custom_calls(saved, "fa3_jax_fwd")) == 1
  assert len(custom_calls(recomputed, "fa3_jax_fwd")) == 2


def test_segment_ids_lower_to_the_varlen_custom_calls(kernels_compiled):
  # flash_attn_func with segment ids runs as the packing of its batch's rows: batch * max_segments sequences of at
  # most seqlen rows each, the very custom calls of the equivalent flash_attn_varlen_func call.
  b, s, m = 2, 64, 3
  q, k, v = inputs(b=b, sq=s, sk=s, d=64)
  ids = jnp.zeros((b, s), jnp.int32)
  loss = lambda f: lambda *a: f(*a).astype(jnp.float32).sum()
  segmented = lambda q, k, v, ids: fa3_jax.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, max_segments=m)
  text = cuda_stablehlo(jax.grad(loss(segmented), argnums=(0, 1, 2)), q, k, v, ids)

  def varlen_call(q, k, v, cu_q, cu_k, used_q, used_k):
    return fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, s, s, seqused_q=used_q, seqused_k=used_k, causal=True)

  cu, used = jnp.zeros((b * m + 1,), jnp.int32), jnp.zeros((b * m,), jnp.int32)
  packed = [x.reshape(b * s, *x.shape[2:]) for x in (q, k, v)]
  want = cuda_stablehlo(jax.grad(loss(varlen_call), argnums=(0, 1, 2)), *packed, cu, cu, used, used)
  without_names = lambda call: re.sub(r"%[\w#.]+", "%", call)
  for target in ("fa3_jax_fwd", "fa3_jax_bwd"):
    (call,), (expected,) = custom_calls(text, target), custom_calls(want, target)
    assert without_names(call) == without_names(expected)
  (fwd,) = custom_calls(text, "fa3_jax_fwd")
  assert "with_cu_seqlens_q = true" in fwd and "with_seqused_k = true" in fwd and "max_seqlen_q = 64 : i64" in fwd
  assert signature(fwd).startswith("(tensor<128x8x64xbf16>, tensor<128x2x64xbf16>, tensor<128x2x64xbf16>, "
                                   "tensor<7xi32>, tensor<7xi32>, tensor<6xi32>, tensor<6xi32>) -> "
                                   "(tensor<128x8x64xbf16>, tensor<8x128xf32>")


def test_shared_segment_ids_are_derived_by_one_custom_call_per_direction(kernels_compiled):
  # Self-attention segment ids become the packed layout in fa3_jax_segment_layout (forward and backward each derive
  # it once); distinct q / kv ids need their key runs matched by id and derive in XLA.
  b, s, m = 2, 64, 3
  q, k, v = inputs(b=b, sq=s, sk=s, d=64)
  ids = jnp.zeros((b, s), jnp.int32)
  shared = lambda q, k, v, ids: fa3_jax.flash_attn_func(q, k, v, q_segment_ids=ids, max_segments=m).sum()
  text = cuda_stablehlo(jax.grad(shared, argnums=(0, 1, 2)), q, k, v, ids)
  calls = custom_calls(text, "fa3_jax_segment_layout")
  assert len(calls) == 2
  for call in calls:
    assert "max_segments = 3 : i64" in call
    assert signature(call).startswith("(tensor<2x64xi32>) -> (tensor<7xi32>, tensor<6xi32>, tensor<?xui8>)")
  distinct = lambda q, k, v, ids: fa3_jax.flash_attn_func(q, k, v, q_segment_ids=ids, kv_segment_ids=ids + 0,
                                                          max_segments=m).sum()
  text = cuda_stablehlo(jax.grad(distinct, argnums=(0, 1, 2)), q, k, v, ids)
  assert not custom_calls(text, "fa3_jax_segment_layout") and len(custom_calls(text, "fa3_jax_fwd")) == 1


def test_vmapped_segment_ids_derive_in_one_call_over_the_folded_rows(kernels_compiled):
  # The vmapped copies' rows are more batch rows of one derivation and one forward call.
  q, k, v = inputs(b=2, sq=48, sk=48, d=64)
  ids = jnp.zeros((2, 48), jnp.int32)
  f = jax.vmap(lambda q, k, v, ids: fa3_jax.flash_attn_func(q, k, v, q_segment_ids=ids, max_segments=4))
  text = cuda_stablehlo(f, *[jnp.stack([x] * 3) for x in (q, k, v, ids)])
  (call,) = custom_calls(text, "fa3_jax_segment_layout")
  assert signature(call).startswith("(tensor<6x48xi32>) -> (tensor<25xi32>, tensor<24xi32>, tensor<?xui8>)")
  assert len(custom_calls(text, "fa3_jax_fwd")) == 1


def test_kvcache_runs_the_forward_kernel_on_the_cache_in_place(kernels_compiled):
  q = jnp.zeros((4, 1, 8, 128), jnp.bfloat16)
  cache = jnp.zeros((4, 512, 2, 128), jnp.bfloat16)
  new = jnp.zeros((4, 1, 2, 128), jnp.bfloat16)
  lens = jnp.zeros((4,), jnp.int32)
  step = lambda q, kc, vc, k, v, n: fa3_jax.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=n, causal=True)
  text = cuda_stablehlo(step, q, cache, cache, new, new, lens)
  (call,) = custom_calls(text, "fa3_jax_fwd")
  for flag in ("with_cu_seqlens_q = false", "with_cu_seqlens_k = false", "with_seqused_k = true"):
    assert flag in call
  # The caches themselves (BSHD, no gathered copy) are the kernel's keys; seqused_k = cache_seqlens + 1. The 8
  # query heads of one token are packed as 4 rows per KV head (pack_gqa=None decides).
  assert signature(call).startswith(
      "(tensor<4x4x2x128xbf16>, tensor<4x512x2x128xbf16>, tensor<4x512x2x128xbf16>, tensor<4xi32>) -> ")
  # With cache_leftpad the same buffer is the packed keys: sequence b starts at b * 512 + leftpad[b].
  left = lambda q, kc, vc, n, lp: fa3_jax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, cache_leftpad=lp)
  (call,) = custom_calls(cuda_stablehlo(left, q, cache, cache, lens, lens), "fa3_jax_fwd")
  assert "with_cu_seqlens_k = true" in call and "max_seqlen_k = 512 : i64" in call
  assert signature(call).startswith("(tensor<4x4x2x128xbf16>, tensor<2048x2x128xbf16>, tensor<2048x2x128xbf16>, ")


def test_paged_kvcache_reaches_the_forward_kernel_gathered_per_call(kernels_compiled):
  # The pages and their table travel as the call's sequence layout down to the shard-local op, which (until the
  # kernel reads pages) gathers each sequence's keys into BSHD rows: 8 pages of 64 rows per sequence.
  q = jnp.zeros((4, 1, 8, 128), jnp.bfloat16)
  pages = jnp.zeros((40, 64, 2, 128), jnp.bfloat16)
  table = jnp.zeros((4, 8), jnp.int32)
  lens = jnp.zeros((4,), jnp.int32)
  f = lambda q, kc, vc, t, n: fa3_jax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, page_table=t)
  text = cuda_stablehlo(f, q, pages, pages, table, lens)
  (call,) = custom_calls(text, "fa3_jax_fwd")
  assert "with_seqused_k = true" in call and "with_cu_seqlens_k = false" in call
  assert signature(call).startswith(
      "(tensor<4x4x2x128xbf16>, tensor<4x512x2x128xbf16>, tensor<4x512x2x128xbf16>, tensor<4xi32>) -> ")
  # vmapped copies of pages and tables fold into one call over the merged pages.
  stack = lambda *xs: [jnp.stack([x] * 3) for x in xs]
  (call,) = custom_calls(cuda_stablehlo(jax.vmap(f), *stack(q, pages, pages, table, lens)), "fa3_jax_fwd")
  assert signature(call).startswith("(tensor<12x4x2x128xbf16>, tensor<12x512x2x128xbf16>, ")


def test_kvcache_packs_gqa_where_every_query_row_sees_the_same_keys(kernels_compiled):
  cache = jnp.zeros((2, 512, 2, 128), jnp.bfloat16)
  lens = jnp.zeros((2,), jnp.int32)

  def q_operand(seqlen_q, **kwargs):
    q = jnp.zeros((2, seqlen_q, 8, 128), jnp.bfloat16)
    f = lambda q, kc, vc, n: fa3_jax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, **kwargs)
    (call,) = custom_calls(cuda_stablehlo(f, q, cache, cache, lens), "fa3_jax_fwd")
    return signature(call).split(",")[0]

  assert q_operand(1, causal=True) == "(tensor<2x4x2x128xbf16>"  # one token: causal sees every key
  assert q_operand(3) == "(tensor<2x12x2x128xbf16>"               # no mask: 3 rows x 4 heads per KV head
  assert q_operand(3, causal=True) == "(tensor<2x3x8x128xbf16>"   # rows see different keys: unpacked
  assert q_operand(1, window_size=(16, 0)) == "(tensor<2x1x8x128xbf16>"
  assert q_operand(1, pack_gqa=False) == "(tensor<2x1x8x128xbf16>"
  assert q_operand(64) == "(tensor<2x64x8x128xbf16>"              # 256 rows per KV head: more than a tile
  assert q_operand(64, pack_gqa=True) == "(tensor<2x256x2x128xbf16>"
  with pytest.raises(NotImplementedError, match="pack_gqa=True needs every query row to see the same keys"):
    q_operand(3, causal=True, pack_gqa=True)


def test_kvcache_num_splits_reaches_the_forward_kernel(kernels_compiled):
  q = jnp.zeros((1, 1, 32, 128), jnp.bfloat16)
  cache = jnp.zeros((1, 65536, 8, 128), jnp.bfloat16)
  lens = jnp.full((1,), 1000, jnp.int32)
  split = lambda n: lambda q, kc, vc, lens: fa3_jax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                                            num_splits=n)
  for requested, expected in ((3, 3), (1, 1), (0, 15)):  # 0: 8 packed tiles on 132 SMs take 15 splits
    (call,) = custom_calls(cuda_stablehlo(split(requested), q, cache, cache, lens), "fa3_jax_fwd")
    assert f"num_splits = {expected} : i64" in call
  # Packed keys (cache_leftpad) split too: the partials cover BSHD query rows.
  left = lambda q, kc, vc, lens: fa3_jax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=lens,
                                                                num_splits=5)
  (call,) = custom_calls(cuda_stablehlo(left, q, cache, cache, lens), "fa3_jax_fwd")
  assert "num_splits = 5 : i64" in call and "with_cu_seqlens_k = true" in call

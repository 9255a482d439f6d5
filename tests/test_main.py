"""`python -m fa3_jax` on CPU: the report says why no kernel runs, --seqlens is honoured or rejected, the timing is in
milliseconds with the reference-path note; the self-check's choice of checks and its runner (the reference plays the
kernel here)."""

import collections
import sys
import types

import jax
import pytest

import fa3_jax
from fa3_jax import __main__ as cli
from fa3_jax import _extension
from fa3_jax import _ops
from fa3_jax import testing

HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 128), (192, 192), (256, 256)]
ALL = {(dtype, d, dv) for dtype in ("bfloat16", "float16") for d, dv in HEAD_DIMS}
TINY = dict(batch=1, seqlen_q=37, seqlen_k=53, heads=2, kv_heads=1)


def mask_of(case):
  return case.causal, case.window_size, case.softcap


def test_fast_self_check_checks_each_configuration_once_and_rotates_the_masks():
  cases = cli.self_check_cases(ALL, ALL)
  configs = [(c.dtype, c.head_dim, c.head_dim_v) for c in cases]
  assert sorted(configs) == sorted(ALL)
  assert all(c.backward for c in cases)
  assert {(c.batch, c.seqlen_q, c.seqlen_k, c.heads, c.kv_heads) for c in cases} == {(2, 113, 239, 4, 2)}
  masks = [mask_of(testing.KernelCase("bfloat16", 64, 64, 1, 1, **m)) for m in cli.MASKS]
  assert collections.Counter(mask_of(c) for c in cases) == {m: 4 for m in masks}
  for dtype in ("bfloat16", "float16"):
    assert {mask_of(c) for c in cases if c.dtype == dtype} == set(masks)
  for dims in HEAD_DIMS:
    assert len({mask_of(c) for c in cases if (c.head_dim, c.head_dim_v) == dims}) == 2


def test_fast_self_check_runs_every_mask_even_with_one_configuration():
  cases = cli.self_check_cases({("bfloat16", 128, 128)}, set())
  assert [(c.dtype, c.head_dim, c.backward) for c in cases] == [("bfloat16", 128, False)] * 3
  assert len({mask_of(c) for c in cases}) == 3


def test_self_check_covers_backward_only_kernels_and_nothing_without_kernels():
  cases = cli.self_check_cases({("float16", 64, 64)}, {("bfloat16", 64, 64)})
  assert {(c.dtype, c.backward) for c in cases} == {("float16", False), ("bfloat16", True)}
  assert cli.self_check_cases(set(), set()) == []


def test_full_self_check_runs_every_mask_on_longer_shapes():
  cases = cli.self_check_cases(ALL, ALL, full=True)
  assert len(cases) == 3 * len(ALL)
  assert {(c.dtype, c.head_dim, c.head_dim_v, mask_of(c)) for c in cases} == {
      (*config, mask_of(testing.KernelCase("bfloat16", 64, 64, 1, 1, **m))) for config in ALL for m in cli.MASKS}
  assert max(c.seqlen_q for c in cases) == 1024


def test_main_on_cpu_times_the_reference_in_ms_at_the_given_seqlens(capsys):
  assert cli.main(["--seqlens", "64"]) == 0
  out = capsys.readouterr().out
  assert "kernels: not used here" in out and "no GPU visible to JAX" in out
  assert "self-check: skipped" in out
  assert "ms fwd / bwd" in out and "TFLOP/s" not in out
  assert "fa3_jax's numbers are its pure-JAX reference path's" in out and "Hopper GPU" in out
  rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["64"]]
  assert [row[2] for row in rows] == ["False", "True"]  # seqlen, batch, causal, then fwd / bwd per implementation
  for row in rows:
    assert row[1] == "16" and row[4] == "/" and float(row[3]) > 0


@pytest.mark.parametrize("argv, message", [
    (["--seqlens", "0"], "expected a positive integer sequence length, got '0'"),
    (["--seqlens", "128", "-5"], "got '-5'"),
    (["--seqlens", "2k"], "got '2k'"),
    (["--no-timing", "--seqlens", "128"], "not allowed with --no-timing"),
])
def test_bad_seqlens_are_rejected_naming_the_argument(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "argument --seqlens" in err and message in err


def test_self_check_prints_each_check_and_fails_a_wrong_kernel(monkeypatch, capsys):
  cases = [testing.KernelCase("float16", 32, 32, causal=True, **TINY),
           testing.KernelCase("bfloat16", 32, 32, backward=False, window_size=(8, 4), softcap=5.0, **TINY)]
  assert cli.run_self_check(cases, workers=2)
  out = capsys.readouterr().out
  assert out.count("PASS") == 2 and "self-check: 2 of 2 passed" in out
  assert "float16 32x32 fwd+bwd causal, 1 x 37 x 53, heads 2 / kv 1: PASS" in out

  correct = _ops.attention_fwd
  monkeypatch.setattr(_ops, "attention_fwd", lambda *args: (lambda o, l: (o * 1.05, l))(*correct(*args)))
  assert not cli.run_self_check(cases[:1], workers=1)
  out = capsys.readouterr().out
  assert "FAIL: out: max error" in out and "self-check: 0 of 1 passed" in out


def test_self_check_reports_a_check_that_raises_and_runs_the_rest(monkeypatch, capsys):
  def broken(*args):
    raise RuntimeError("no kernel image for this device")

  monkeypatch.setattr(_ops, "attention_fwd", broken)
  cases = [testing.KernelCase("float16", 32, 32, **TINY)] * 2
  assert not cli.run_self_check(cases, workers=1)
  out = capsys.readouterr().out
  assert out.count("FAIL: RuntimeError: no kernel image for this device") == 2


class FakeGpu:
  platform = "gpu"

  def __init__(self, kind, capability):
    self.device_kind, self.compute_capability = kind, capability


def fake_devices(monkeypatch, kind, capability):
  monkeypatch.setattr(jax, "devices", lambda *args: [FakeGpu(kind, capability)])


def test_report_names_a_gpu_that_is_not_hopper(monkeypatch, capsys):
  fake_devices(monkeypatch, "NVIDIA A100-SXM4-80GB", "8.0")
  problem = cli.report()
  assert problem == "the kernels need a Hopper GPU (compute capability 9.0), found NVIDIA A100-SXM4-80GB " \
                    "(compute capability 8.0)"
  out = capsys.readouterr().out
  assert "devices: 1 x NVIDIA A100-SXM4-80GB (gpu, compute capability 8.0)" in out
  assert f"kernels: not used here, every call runs the pure-JAX reference: {problem}" in out


@pytest.mark.parametrize("build_config, expected", [
    (types.SimpleNamespace(cuda_extension=False, reason="no CUDA compiler (nvcc) found: put it on PATH or set CUDACXX"),
     "this install was built without the CUDA extension (no CUDA compiler (nvcc) found: put it on PATH or set "
     "CUDACXX)"),
    (types.SimpleNamespace(cuda_extension=True, reason=""),
     "the CUDA extension was built but does not import (libcuda.so.1: cannot open shared object file)"),
    (None, "fa3_jax is imported from the source tree"),
])
def test_report_says_why_a_hopper_gpu_has_no_kernels(monkeypatch, capsys, build_config, expected):
  fake_devices(monkeypatch, "NVIDIA H200", "9.0")
  monkeypatch.setattr(_extension, "module", None)
  monkeypatch.setattr(_extension, "import_error", ImportError("libcuda.so.1: cannot open shared object file"))
  # The build record as `from fa3_jax import _build_config` finds it: the package's attribute, else sys.modules
  # (where None makes the import fail, as in a source tree without a build).
  monkeypatch.delattr(fa3_jax, "_build_config", raising=False)
  monkeypatch.setitem(sys.modules, "fa3_jax._build_config", build_config)
  problem = cli.report()
  assert problem.startswith(f"this Hopper GPU has no kernels to run: {expected}")
  out = capsys.readouterr().out
  assert f"CUDA extension: not loaded: {expected}" in out
  assert cli.self_check(problem, full=False)
  assert "self-check: skipped (this Hopper GPU has no kernels to run" in capsys.readouterr().out

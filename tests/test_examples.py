"""The examples run on CPU as a user would run them (a subprocess each, small settings) and report PASS, or FAIL with
a non-zero exit status."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
# A tiny model, so that each training run takes seconds on 2 cores.
TINY_LM = ("--steps", "6", "--batch", "2", "--seq", "32", "--dim", "32", "--depth", "1", "--heads", "2",
           "--kv-heads", "1")


def _run(cwd, script, *args, **env):
  """Runs examples/<script> on CPU in directory cwd; returns (exit status, stdout + stderr)."""
  proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def _verdicts(output):
  """The PASS/FAIL words that begin lines (after an optional [timestamp] and indentation)."""
  return re.findall(r"^(?:\[[^\]]*\])?\s*(PASS|FAIL)\b", output, flags=re.MULTILINE)


def test_quickstart_passes_the_fa3_tolerance(tmp_path):
  rc, output = _run(tmp_path, "quickstart.py")
  assert rc == 0, output
  assert _verdicts(output) == ["PASS"] * 5, output  # out, dq, dk, dv and the overall verdict
  assert re.search(r"PASS out: max error \S+ vs allowed \S+", output), output


def test_train_lm_compare_bfloat16_passes_and_plots(tmp_path):
  pytest.importorskip("matplotlib")
  rc, output = _run(tmp_path, "train_lm.py", "--compare", "--dtype", "bfloat16", *TINY_LM)  # default --plot
  assert rc == 0, output
  assert re.search(r"^PASS: fa3's mean distance from the float32 jax\.nn curve \S+ <= \S+ = 2 x jax\.nn bfloat16's "
                   r"distance \S+ \+ --tolerance", output, flags=re.MULTILINE), output
  assert "[jax float32]" in output, output  # the float32 run is not labelled as the bfloat16 "[jax]" one
  plot = tmp_path / "train_lm_loss.png"
  assert f"loss curves written to {plot}" in output, output
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_lm_compare_prints_fail_and_exits_nonzero_beyond_the_tolerance(tmp_path):
  rc, output = _run(tmp_path, "train_lm.py", "--compare", "--dtype", "float32", "--tolerance", "-1", "--plot", "",
                    *TINY_LM)
  assert rc == 1, output
  assert re.search(r"^FAIL: mean \|fa3 - jax\.nn\| over the curve \S+ > --tolerance -1", output,
                   flags=re.MULTILINE), output
  assert not list(tmp_path.iterdir()), "--plot '' writes no file"


def test_train_lm_packed_documents_match_jax_nn_with_the_equivalent_mask(tmp_path):
  rc, output = _run(tmp_path, "train_lm.py", "--packed", "--compare", "--dtype", "float32", "--plot", "", *TINY_LM)
  assert rc == 0, output
  assert re.search(r"^packed: \d+ documents in 2 rows of 33 tokens \(\d+% padding\), at most 4 documents per row",
                   output, flags=re.MULTILINE), output
  assert re.search(r"^PASS: mean \|fa3 - jax\.nn\| over the curve \S+ <= --tolerance", output,
                   flags=re.MULTILINE), output


def test_multi_gpu_on_8_fake_cpu_devices_passes(tmp_path):
  rc, output = _run(tmp_path, "multi_gpu.py", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert rc == 0, output
  assert "8 x cpu" in output, output
  assert _verdicts(output) == ["PASS"] * 6, output  # the sharded step, ring out/dq/dk/dv, overall


TINY_GENERATE = ("--batch", "3", "--max-prompt", "9", "--steps", "4", "--dim", "32", "--heads", "4", "--kv-heads",
                 "2", "--depth", "1", "--vocab", "64")


def test_generate_compare_passes_the_recompute_check_and_plots(tmp_path):
  pytest.importorskip("matplotlib")
  rc, output = _run(tmp_path, "generate.py", "--compare", "--page-size", "4", *TINY_GENERATE)
  assert rc == 0, output
  assert _verdicts(output) == ["PASS", "PASS"], output  # fa3_jax and jax.nn, each against its full recompute
  assert re.search(r"^\[fa3_jax\] 3 prompts of .* cache paged \(4\) of 13 keys$", output, flags=re.MULTILINE), output
  assert re.search(r"^\[jax\.nn\] [\d,]+ tokens/s \(\S+ ms per step\), attention \d+% of a step", output,
                   flags=re.MULTILINE), output
  assert (tmp_path / "generate_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_prints_fail_and_exits_nonzero_beyond_the_tolerance(tmp_path):
  rc, output = _run(tmp_path, "generate.py", "--page-size", "0", "--tolerance", "-1", "--plot", "", *TINY_GENERATE)
  assert rc == 1, output
  assert re.search(r"^FAIL \[fa3_jax\]: decode logits vs a full recompute: max \|difference\| \S+ > tolerance -1$",
                   output, flags=re.MULTILINE), output
  assert "cache contiguous of 13 keys" in output and not list(tmp_path.iterdir()), output

"""The skip summary of tests/conftest.py: under `pytest -q` the reasons for the 's' show once each, GPU tests apart."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent


def _pytest(*args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the GPU tests skip for want of a GPU, also on a GPU machine
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  return proc.stdout + proc.stderr


def test_the_gpu_tests_skip_with_one_line_that_says_why():
  out = _pytest("tests/gpu", cwd=TESTS.parent)
  lines = [line for line in out.splitlines() if "skipped (" in line]
  assert len(lines) == 1, out
  reason = "no GPU visible to JAX (backend cpu): the kernels need a Hopper GPU"
  assert re.fullmatch(rf"GPU tests skipped \(\d+\): {re.escape(reason)}", lines[0]), out


def test_reasons_are_counted_most_frequent_first_and_capped(tmp_path):
  shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
  (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = gpu: needs a GPU\n")
  (tmp_path / "test_skips.py").write_text(
      "import pytest\n"
      "@pytest.mark.gpu\n"
      "@pytest.mark.parametrize('i', range(3))\n"
      "def test_gpu(i):\n"
      "  pytest.skip('no Hopper GPU')\n"
      "@pytest.mark.parametrize('i', range(8))\n"
      "def test_cpu(i):\n"
      "  pytest.skip('reason A' if i < 2 else f'reason {i}')\n"
      "def test_runs():\n"
      "  pass\n")
  out = _pytest(str(tmp_path), cwd=tmp_path)
  lines = [line for line in out.splitlines() if "skipped (" in line]
  assert lines[0] == "GPU tests skipped (3): no Hopper GPU", out
  assert lines[1] == "tests skipped (2): reason A", out
  assert len(lines) == 1 + 5 + 1, out
  assert lines[-1] == "tests skipped (2) for 2 other reasons: `pytest -rs` lists them", out

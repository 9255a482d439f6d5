"""CMakeLists.txt's decision whether to build the CUDA extension: recorded in fa3_jax/_build_config.py with a
readable reason (pip hides CMake's output), and an error under FA3_JAX_CUDA=ON. Configures only, into tmp_path."""

import pathlib
import runpy
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")


def _configure(build_dir, **defines):
  args = [f"-D{name}={value}" for name, value in defines.items()]
  return subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
                         *args], capture_output=True, text=True, timeout=300, check=False)


def _record(build_dir) -> dict:
  return runpy.run_path(str(build_dir / "generated" / "_build_config.py"))


def test_off_records_why(tmp_path):
  proc = _configure(tmp_path, FA3_JAX_CUDA="OFF")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  record = _record(tmp_path)
  assert (record["cuda_extension"], record["reason"]) == (False, "FA3_JAX_CUDA=OFF")


def test_auto_without_cutlass_records_a_reason_without_list_separators(tmp_path):
  proc = _configure(tmp_path, FA3_JAX_CUDA="AUTO", FA3_JAX_CUTLASS_INCLUDE_DIR=tmp_path / "no_cutlass")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  record = _record(tmp_path)
  assert record["cuda_extension"] is False
  # Without nvcc the reason is the compiler's; with it, CUTLASS's, naming the README's command.
  assert record["reason"].startswith(("no CUDA compiler (nvcc) found", "CUTLASS headers not found: run `pip install "
                                      "--no-deps --target build/cutlass nvidia-cutlass==4.2.0.0` in the checkout"))
  assert ";" not in record["reason"]
  assert f"building WITHOUT the CUDA extension ({record['reason']})" in proc.stdout


def test_on_without_cutlass_fails_and_says_why(tmp_path):
  proc = _configure(tmp_path, FA3_JAX_CUDA="ON", FA3_JAX_CUTLASS_INCLUDE_DIR=tmp_path / "no_cutlass")
  assert proc.returncode != 0
  assert "fa3_jax: FA3_JAX_CUDA=ON but " in proc.stderr

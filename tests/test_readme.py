"""The README's Python examples run as written (on CPU: the reference path), and what it says about the install
matches pyproject.toml."""

import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_examples():
  assert PYTHON_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs_as_written(index):
  code = PYTHON_BLOCKS[index]
  # flax's make_causal_mask returns float32 by default, which boolean-mask APIs reject: examples must ask for bool.
  for call in re.findall(r"make_causal_mask\((?:[^()]|\([^()]*\))*\)", code):
    assert "dtype=bool" in call, call
  exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})


def test_the_readme_states_the_python_that_pyproject_requires():
  requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
  version = requires.removeprefix(">=")
  assert f"Python {version} or newer" in README
  assert f"python{version} -m venv" in README


def test_the_readme_installs_the_kernels_editable_and_offline_capable():
  bash = "\n".join(re.findall(r"^```bash\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL))
  # The documented order: build tools and CUTLASS first, then the build that uses them, then the tests, which must
  # not reinstall (an isolated rebuild would find no CUTLASS and install pure Python).
  commands = [line.split("#")[0].strip() for line in bash.splitlines()]
  cuda = next(i for i, c in enumerate(commands) if "FA3_JAX_CUDA=ON" in c)
  assert "--target build/cutlass nvidia-cutlass==4.2.0.0" in commands[cuda - 1]
  assert "--no-build-isolation -e" in commands[cuda]
  assert not any("pip install" in c for c in commands if "pytest" in c)

"""The benchmark scripts of benchmarks/, loaded as modules for their tests (they are scripts, not a package)."""

import importlib.util
import pathlib
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
  """(module, path) of benchmarks/<name>.py, registered under `name` (dataclasses look their module up by name)."""
  path = BENCHMARKS / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault(name, module)
  spec.loader.exec_module(module)
  return module, path

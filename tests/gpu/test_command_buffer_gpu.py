"""The FFI targets are declared command-buffer compatible: XLA may trace them into CUDA graphs and replay them.
Checked in fresh processes (XLA reads XLA_FLAGS once per process): with command buffers forced on for every op, the
custom calls must land inside a command buffer (XLA's dumped thunk listing), and forward + backward on new inputs
(new buffer contents, graph replays) must be bitwise equal to a run with command buffers off."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from fa3_jax import _extension

pytestmark = pytest.mark.gpu

PROGRAM = """
import sys
import jax, jax.numpy as jnp, numpy as np
import fa3_jax

@jax.jit
def step(q, k, v, dout):
  attention = lambda q, k, v: fa3_jax.flash_attn_func(q * 1.5, k, v, causal=True, deterministic=True)
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(dout))

results = []
for seed in (0, 1, 0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, dout = (jax.random.normal(key, (2, 300, 4, 128), jnp.bfloat16) for key in keys)
  for _ in range(2):
    results += [np.asarray(x.astype(jnp.float32)) for x in step(q, k, v, dout)]
np.savez(sys.argv[1], *results)
"""


def run_program(tmp_path: pathlib.Path, name: str, xla_flags: str) -> list[np.ndarray]:
  env = dict(os.environ, XLA_FLAGS=xla_flags, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
  out = tmp_path / f"{name}.npz"
  subprocess.run([sys.executable, "-c", PROGRAM, str(out)], env=env, check=True, timeout=600)
  with np.load(out) as data:
    return [data[f"arr_{i}"] for i in range(len(data.files))]


def test_kernels_replay_correctly_from_command_buffers(tmp_path):
  compiled = lambda direction: ("bfloat16", 128, 128) in _extension.compiled_kernels(direction)
  if not (compiled("fwd") and compiled("bwd")):
    pytest.skip("needs the bf16 head dim 128 kernels")
  dump = tmp_path / "dump"
  graphs = run_program(tmp_path, "graphs", f"--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL "
                                           f"--xla_gpu_graph_min_graph_size=1 --xla_dump_to={dump}")
  plain = run_program(tmp_path, "plain", "--xla_gpu_enable_command_buffer=")

  assert len(graphs) == len(plain) == 24
  for i, (a, b) in enumerate(zip(graphs, plain)):
    np.testing.assert_array_equal(a, b, err_msg=f"output {i % 4} of call {i // 4}")
  # The third input set repeats the first: replays after other inputs must reproduce the first results.
  for a, b in zip(graphs[:8], graphs[16:]):
    np.testing.assert_array_equal(a, b)

  # XLA's thunk listing for the step (pre-order): with command buffers on, one command buffer must hold the whole
  # step, the two custom calls included; were they left out, the fusions around them would form separate buffers.
  kinds = re.findall(r'thunk_kind: "(\w+)"', next(dump.glob("*jit_step.thunk_metadata.txt")).read_text())
  assert kinds[0] == "kCommandBuffer" and kinds.count("kCommandBuffer") == 1, kinds
  assert kinds.count("kCustomCall") == 2, kinds

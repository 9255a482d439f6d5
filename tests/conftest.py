"""Test setup, before any JAX backend starts: 8 fake CPU devices for the sharding tests, and on a GPU no memory
preallocation (`pytest -n` runs several processes on one GPU; each would take 75% of its memory). After the run, one
line per skip reason, so that `-q` says why the tests marked 's' did not run."""

import collections
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after the environment it reads)

jax.config.update("jax_num_cpu_devices", 8)

# Reasons shown per kind of test; `pytest -rs` lists every skipped test.
MAX_REASONS = 5


def skip_summary(reports) -> list[str]:
  """'GPU tests skipped (n): reason' / 'tests skipped (n): reason' lines for skipped test reports, most frequent
  reasons first."""
  counts = collections.Counter()
  for report in reports:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    counts["GPU tests" if "gpu" in report.keywords else "tests", reason.removeprefix("Skipped: ")] += 1
  lines = []
  for kind in ("GPU tests", "tests"):
    reasons = [(n, reason) for (k, reason), n in counts.most_common() if k == kind]
    lines += [f"{kind} skipped ({n}): {reason}" for n, reason in reasons[:MAX_REASONS]]
    if len(reasons) > MAX_REASONS:
      rest = sum(n for n, _ in reasons[MAX_REASONS:])
      lines.append(f"{kind} skipped ({rest}) for {len(reasons) - MAX_REASONS} other reasons: `pytest -rs` lists them")
  return lines


def pytest_terminal_summary(terminalreporter):
  for line in skip_summary(terminalreporter.stats.get("skipped", [])):
    terminalreporter.write_line(line)

"""cuda/tests/fwd_ab.py: medians and paired per-round changes of an interleaved forward A/B."""
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "cuda" / "tests" / "fwd_ab.py"


def _line(variant, rnd, mask, a, b):
  return (f"{variant} r{rnd} bench bf16_64x64 {mask} h=32:      1k {a:6.1f}      2k {b:6.1f}   TFLOP/s")


def test_medians_and_paired_changes():
  lines = [
      _line("main", 1, "causal", 100.0, 200.0), _line("new", 1, "causal", 110.0, 200.0),
      _line("main", 2, "causal", 100.0, 210.0), _line("new", 2, "causal", 90.0, 189.0),
      _line("main", 3, "causal", 104.0, 190.0), _line("new", 3, "causal", 104.0, 190.0),
      "device: NVIDIA H200, cc 9.0, 132 SMs",
  ]
  out = subprocess.run([sys.executable, str(SCRIPT)], input="\n".join(lines), capture_output=True, text=True,
                       check=True).stdout
  rows = {l.split()[2]: l for l in out.splitlines()[1:]}
  assert rows["main"].split()[3:5] == ["100.0", "200.0"]  # medians of (100, 100, 104) and (200, 210, 190)
  new = rows["new"]
  assert new.split()[3:5] == ["104.0", "190.0"]
  # Median change +4.0 % at 1k (104 vs 100), paired rounds +10 %, -10 %, 0 %; at 2k -5.0 %, rounds 0, -10, 0.
  assert "+4.0% (-10.0..+10.0)" in new
  assert "-5.0% (-10.0..+0.0)" in new

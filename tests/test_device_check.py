"""`benchmarks/device_check.sh --smoke` runs end to end here, as it will on a GPU."""

import json
import os
import subprocess
import sys

from tests.xla_testing import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")


def _run(*args, **env):
  return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, PYTHON=sys.executable,
                                              XLA_FLAGS=xla_flags(1),
                                              **env))


def test_smoke_run_writes_every_figure(tmp_path):
  out = tmp_path / "out"
  proc = _run("--smoke", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  by_kind = {}
  for line in lines:
    by_kind.setdefault(line["benchmark"], []).append(line)
  assert not [line for line in lines if "error" in line]

  environment, = by_kind["environment"]
  assert environment["backend"] == "cpu" and environment["jax"]
  parity = by_kind["hf_parity"]
  assert {p["family"] for p in parity} == {"relu", "gated-gelu"}
  assert all(p["logits_rel_error"] < 1e-4 for p in parity), parity

  steps = by_kind["distill_step"]
  assert sorted((s["impl"], s["attention"] if s["impl"] == "jax" else "-") for s in steps) == [
      ("jax", "auto"), ("torch", "-")]
  for shape in {(s["batch"], s["inputs"]) for s in steps}:
    pair = {s["impl"]: s for s in steps if (s["batch"], s["inputs"]) == shape
            and s.get("attention") != "explicit"}
    # Same weights, batch and loss terms: the first (pre-update) losses agree
    # (bf16 compute on both sides).
    assert abs(pair["jax"]["first_loss"] - pair["torch"]["first_loss"]) < 2e-2, pair
    assert pair["jax"]["tokens_per_s"] > 0 and pair["jax"]["mfu"] > 0

  # The fused head's temporaries against formed logits, on the device's compiler.
  memory = {m["head"]: m["temp_mb"] for m in by_kind["vocab_loss_memory"]}
  assert set(memory) == {"formed", "fused"} and memory["fused"] < memory["formed"]

  summary, = by_kind["device_check_summary"]
  assert summary["failures"] == 0 and len(summary["shapes"]) == 1
  assert all(s["ours_over_pytorch_tokens_per_s"] > 0 for s in summary["shapes"])
  assert set(summary["loss_temp_mb"]) == {"2048/formed", "2048/fused"}
  assert (out / "device_check.log").read_text().count("exit 0 after") == 4


def test_bad_arguments_are_refused():
  proc = _run("--fast")
  assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
  help_text = _run("--help")
  assert help_text.returncode == 0 and "--smoke" in help_text.stdout


def test_shellcheck_is_clean():
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  proc = subprocess.run([shellcheck, SCRIPT], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout

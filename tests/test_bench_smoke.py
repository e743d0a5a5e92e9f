"""The constraint benchmark runs end to end at a tiny size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_constraint_bench_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/constraint.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "constraint.json").read_text())
    assert data and (tmp_path / "constraint.md").read_text().startswith("# Constraint benchmark")


def test_engine_bench_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/engine.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "engine.json").read_text())
    modes = {(c["config"], c["mode"]) for c in data["calls"]}
    assert modes == {("tiny", "unconstrained"), ("tiny", "constrained")}
    assert all(c["valid_calls"] == c["calls"] for c in data["calls"] if c["mode"] == "constrained")
    assert data["session"]["prefill_tokens"]["cached"] < data["session"]["prefill_tokens"]["re-encoded"]
    assert data["sampler"]["speedup"] > 0

"""benchmarks/device_check.sh, shrunk to the CPU: every step runs and leaves its output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_device_check_runs_every_step_and_writes_one_folder(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--shrink",
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stdout + done.stderr
    for step in ("cuda_tests", "throughput", "throughput_compiled", "fit"):
        assert f"== {step} (at most " in summary and (out / f"{step}.log").is_file()
    assert "all steps passed" in summary
    runs = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert [run["compile"] for run in runs] == ["none", "encoder"]  # eager, then compiled
    for run in runs:
        assert run["batches"] == 1 and run["result"]["train_s_per_batch_c16"] > 0
    assert json.loads((out / "fit_result.json").read_text())["status"] == "ok"


def test_the_device_check_refuses_an_unknown_argument(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--gpus", "2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "unknown argument --gpus" in done.stderr

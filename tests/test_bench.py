"""titans-bench: one tiny run end to end, skipping finished runs, and the rendered table."""
import json
from pathlib import Path

import pytest

from titans_lightning import bench

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--model.dim_feedforward=8", "--trainer.callbacks=[]"]


@pytest.mark.skipif(not (SHARED / "sinwave").is_dir(), reason="published arrays not found")
def test_one_run_writes_a_result_skips_when_done_and_renders(tmp_path, capsys):
    argv = ["--strategies", "titans_default", "--benchmarks", "sinwave", "--seeds", "3",
            "--threads", "1", "--accelerator", "cpu", "--out", str(tmp_path), "--", *TINY]
    bench.main(argv)
    result = tmp_path / "results" / "sinwave__titans_default__shared__default__seed3.json"
    record = json.loads(result.read_text())
    for key in ("strategy", "benchmark", "memory_scope", "protocol", "seed", "best_epoch",
                "val_mse", "test_mse", "wall_s", "device", "commit", "config"):
        assert key in record, key
    assert record["seed"] == 3 and record["config"]["seed_everything"] == 3
    assert record["config"]["data"]["init_args"]["data_dir"].endswith("sinwave")
    assert 0 < record["test_mse"] < 10
    bench.main(argv)
    assert "done already" in capsys.readouterr().out
    table = (tmp_path / "RESULTS.md").read_text()
    assert f"{record['test_mse']:.4f} (1 seed)" in table
    assert "| titans_default | 0.019 | 0.051 | 0.032 |" in table


def test_resume_picks_the_newest_last_checkpoint(tmp_path):
    import os
    import time

    old = tmp_path / "sinwave" / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "sinwave" / "version_1" / "checkpoints" / "last.ckpt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_text("x")
        os.utime(path, (time.time() + i, time.time() + i))
    assert bench.latest_checkpoint(tmp_path) == new
    assert bench.latest_checkpoint(tmp_path / "nothing") is None


def test_concurrent_runs_share_the_cores():
    assert bench.threads_per_run(1, cores=8) == 8
    assert bench.threads_per_run(2, cores=8) == 4
    assert bench.threads_per_run(3, cores=2) == 1

"""The `titans` command: shipped configs, the run record, test and predict from a checkpoint."""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.sinwave import make_sinwave_splits
from titans_lightning.cli import TitansCLI, main
from titans_lightning.module import TitansForecaster

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))
BENCHMARKS = {"sinwave.yaml": (16, 20), "weather.yaml": (16, 20), "sinwave_long.yaml": (32, 30)}
RESULT_KEYS = {"status", "config", "commit", "seed", "wall_s", "best_epoch", "val_mse", "test_mse",
               "test_mae", "strategy", "strategy_source", "memory_scope", "memory_updates",
               "curve", "device"}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_the_three_benchmarks_are_shipped():
    assert set(BENCHMARKS) <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_starts_with_its_command_and_instantiates(name, config_args, in_tmp):
    first_line = (CONFIGS / name).read_text().splitlines()[0]
    assert first_line.startswith("# titans ") and f"--config configs/{name}" in first_line

    cli = TitansCLI(config_args(name), run=False)

    assert cli.model.hparams.context_window == cli.datamodule.context_window
    assert cli.model.hparams.input_dim == cli.datamodule.input_dim
    assert cli.trainer.validate_loop.inference_mode is False
    if name in BENCHMARKS:
        window, epochs = BENCHMARKS[name]
        assert (cli.model.hparams.context_window, cli.trainer.max_epochs) == (window, epochs)
        assert cli.datamodule.batch_size == 4
        assert cli.config["seed_everything"] == 0
        assert cli.trainer.checkpoint_callback.monitor == "val/mse"
        assert cli.trainer.logger.name == name.removesuffix(".yaml")


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_config_fits_an_epoch_and_records_the_result(name, config_args, in_tmp):
    main(["fit", *config_args(name), *QUIET, "--model.dim_feedforward", "32",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"])

    (path,) = in_tmp.glob("logs/*/version_0-*/result.json")
    assert path.parent.parent.name == name.removesuffix(".yaml")
    assert path.parent.name == "version_0-titans_default-shared-reference-seed0"
    result = json.loads(path.read_text())
    assert set(result) == RESULT_KEYS
    assert math.isfinite(result["test_mse"]) and math.isfinite(result["val_mse"])
    assert result["best_epoch"] == 0 and result["seed"] == 0
    assert result["strategy"] == "titans_default" and result["memory_scope"] == "shared"
    assert result["device"].split(":")[0] == ("cuda" if torch.cuda.is_available() else "cpu")
    config, (window, _) = result["config"], BENCHMARKS[name]
    assert config["model"]["dim_feedforward"] == 32
    assert config["model"]["context_window"] == window
    assert config["data"]["init_args"]["context_window"] == window
    assert config["model"]["input_dim"] == (5 if name == "weather.yaml" else 1)
    assert config["trainer"]["max_epochs"] == 1


def fit_tiny(args: list[str], *extra: str) -> TitansCLI:
    return TitansCLI(["fit", *args, "--trainer.max_epochs", "1", *extra])


def test_fit_twice_into_the_same_log_folder(tiny_sinwave, in_tmp):
    first = fit_tiny(tiny_sinwave, "--trainer.limit_train_batches", "2")
    second = fit_tiny(tiny_sinwave, "--trainer.limit_train_batches", "2")
    assert Path(first.trainer.log_dir).name == "version_0-titans_default-shared-reference-seed0"
    assert Path(second.trainer.log_dir).name == "version_1-titans_default-shared-reference-seed0"
    for cli in (first, second):
        assert (Path(cli.trainer.log_dir) / "result.json").is_file()
        assert Path(cli.trainer.checkpoint_callback.last_model_path).parent.parent == \
            Path(cli.trainer.log_dir)


def test_standalone_test_continues_from_the_checkpoints_memory(tiny_sinwave, tiny, in_tmp):
    ckpt = fit_tiny(tiny_sinwave).trainer.checkpoint_callback.last_model_path
    saved = TitansForecaster.load_from_checkpoint(ckpt).model  # the memory as checkpointed

    tested = TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt]).model.model

    # Replaying the test split on the checkpointed memory gives the memory the test run ended with.
    test_split = make_sinwave_splits(20, tiny["seq_len"], seed=0)["test"]
    saved.eval()
    with torch.no_grad():
        saved(torch.as_tensor(test_split, dtype=torch.float32))
    for after_test, replayed in zip(tested.memories, saved.memories):
        assert int(after_test.num_updates) == int(replayed.num_updates)
        assert torch.equal(after_test.fast_weights, replayed.fast_weights)
        for name, value in replayed.state.items():
            assert torch.equal(after_test.state[name], value)
    before = torch.load(ckpt, weights_only=True)["state_dict"]
    first = tested.memories[0]
    assert int(first.num_updates) == int(before["model.layers.0.memory.num_updates"]) + \
        tiny["updates_per_batch"]
    assert not torch.equal(first.fast_weights, before["model.layers.0.memory.fast_weights"])


def test_predict_writes_a_row_per_sequence_and_target_position(tiny_sinwave, tiny, in_tmp):
    ckpt = fit_tiny(tiny_sinwave, "--trainer.limit_train_batches", "2") \
        .trainer.checkpoint_callback.last_model_path
    cli = TitansCLI(["predict", *tiny_sinwave, "--ckpt_path", ckpt])

    frame = pd.read_csv(Path(cli.trainer.log_dir) / "predictions.csv")
    T, C, n = tiny["seq_len"], tiny["window"], tiny["test_sequences"]
    assert list(frame.columns) == ["sequence", "position", "prediction", "target", "valid"]
    assert len(frame) == n * (T - 1)
    assert sorted(frame["sequence"].unique()) == list(range(n))
    # the forecast of position p is made at step p-1, which has a full window from p-1 = C-1
    assert frame["valid"].to_numpy().tolist() == [p >= C for p in frame["position"]]
    assert frame.loc[frame["valid"], "prediction"].notna().all()
    assert frame.loc[~frame["valid"], "prediction"].isna().all()
    test_split = make_sinwave_splits(20, T, seed=0)["test"][..., 0]  # (n, T)
    expected = test_split[frame["sequence"], frame["position"]]
    np.testing.assert_allclose(frame["target"], expected, rtol=1e-6)
    # the prediction at position p is the forecast the model made at step p-1 (replayed on the
    # checkpoint's memory: the predict split is one batch here)
    model = TitansForecaster.load_from_checkpoint(ckpt).model.eval()
    with torch.no_grad():
        preds, _ = model(torch.as_tensor(test_split[..., None], dtype=torch.float32))  # (n, T, 1)
    made_at = preds[frame["sequence"].to_numpy(), frame["position"].to_numpy() - 1, 0].numpy()
    valid = frame["valid"].to_numpy()
    np.testing.assert_allclose(frame["prediction"].to_numpy()[valid], made_at[valid], rtol=1e-5,
                               atol=1e-6)


def titans_command() -> list[str]:
    script = Path(sys.executable).parent / "titans"
    if script.is_file():
        return [str(script)]
    found = shutil.which("titans")
    return [found] if found else [sys.executable, "-m", "titans_lightning.cli"]


def test_inference_mode_on_the_command_line_fails_with_a_clear_message(tiny_sinwave, in_tmp):
    run = subprocess.run(
        [*titans_command(), "validate", *tiny_sinwave, "--trainer.inference_mode", "true"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: the neural memory learns during validation")
    assert "inference_mode=False" in last_line


def test_the_best_validation_epoch_is_the_one_tested_and_recorded(tiny_sinwave, in_tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "5"])
    run = Path(cli.trainer.log_dir)
    result = json.loads((run / "result.json").read_text())
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("val/mse")]  # one per epoch, in order
    assert len(logged) == 5
    assert result["best_epoch"] == int(np.argmin(logged)) != 4  # not simply the last epoch
    assert result["val_mse"] == pytest.approx(min(logged), rel=1e-6)
    # the record's learning curve is the logged one, epoch by epoch
    curve = result["curve"]
    assert [entry["epoch"] for entry in curve] == [0, 1, 2, 3, 4]
    assert [entry["val_mse"] for entry in curve] == pytest.approx(logged, rel=1e-6)
    train_losses = [e.value for e in events.Scalars("train/loss")]
    assert [entry["train_loss"] for entry in curve] == pytest.approx(train_losses, rel=1e-5)
    assert curve[result["best_epoch"]]["val_mse"] == pytest.approx(result["val_mse"], rel=1e-6)
    best = cli.trainer.checkpoint_callback.best_model_path
    assert torch.load(best, weights_only=True)["epoch"] == result["best_epoch"]
    rescored = TitansCLI(["test", *tiny_sinwave, "--ckpt_path", best])
    assert result["test_mse"] == pytest.approx(
        float(rescored.trainer.callback_metrics["test/mse"]), rel=1e-6)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty|-unknown)?", result["commit"])


def test_a_record_names_its_commit_and_says_when_its_code_differs_from_it(tmp_path):
    from titans_lightning.results import git_commit

    code = ("pkg", "tools/*.py")
    assert git_commit(tmp_path, code) is None  # no checkout
    run = functools.partial(subprocess.run, cwd=tmp_path, check=True, capture_output=True)
    run(["git", "init", "-q"])
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("a table\n")
    run(["git", "add", "pkg/code.py", "notes.md"])
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one"])
    head = run(["git", "rev-parse", "HEAD"], text=True).stdout.strip()
    (tmp_path / "notes.md").write_text("a table, updated\n")  # not code
    (tmp_path / "scratch.txt").write_text("untracked, outside the code\n")
    (tmp_path / "tools" / "table.md").write_text("not a .py file\n")
    assert git_commit(tmp_path, code) == head
    assert git_commit(tmp_path / "pkg", code) == head  # asked from inside the checkout
    (tmp_path / "tools" / "bench.py").write_text("untracked code counts\n")
    assert git_commit(tmp_path, code) == f"{head}-dirty"
    (tmp_path / "tools" / "bench.py").unlink()
    (tmp_path / "pkg" / "new_rule.py").write_text("a rule not yet added\n")
    assert git_commit(tmp_path, code) == f"{head}-dirty"
    (tmp_path / "pkg" / "new_rule.py").unlink()
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path, code) == f"{head}-dirty"
    (tmp_path / "venv" / "site").mkdir(parents=True)  # an installed copy, untracked here
    assert git_commit(tmp_path / "venv" / "site", code) is None


def test_an_integer_batch_limit_is_a_count_of_batches_even_one(tiny_sinwave):
    """Lightning takes limit_train_batches=1.0 as the whole split and 1 as one batch; the CLI
    must not turn the 1 a user typed into 1.0 (it did, by Lightning's Union[float, int])."""
    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "1", "--trainer.limit_test_batches", "1"])
    assert cli.trainer.global_step == 1  # of 4 batches
    other = TitansCLI([*tiny_sinwave, "--trainer.limit_train_batches", "1.0",
                       "--trainer.limit_val_batches", "0.5"], run=False)
    assert type(other.trainer.limit_train_batches) is float  # 1.0: the whole split
    assert other.trainer.limit_val_batches == 0.5  # a fraction stays a fraction


def test_lightnings_environment_defaults_for_the_batch_limits_still_count(tiny_sinwave,
                                                                          monkeypatch):
    monkeypatch.setenv("PL_TRAINER_LIMIT_TRAIN_BATCHES", "2")
    cli = TitansCLI([*tiny_sinwave], run=False)
    assert cli.trainer.limit_train_batches == 2
    given = TitansCLI([*tiny_sinwave, "--trainer.limit_train_batches", "3"], run=False)
    assert given.trainer.limit_train_batches == 3  # the command line over the environment


def test_version(capsys):
    from titans_lightning import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"titans-lightning {__version__} (torch ")


def test_the_scalar_tags_are_the_ones_the_readme_names(tiny_sinwave, in_tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2",
                     "--trainer.callbacks", "[]"])
    events = EventAccumulator(str(cli.trainer.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/mse", "val/mae", "test/mse", "test/mae"} <= tags
    assert not {t for t in tags if t.endswith(("_step", "_epoch"))}
    assert len(events.Scalars("train/loss")) == 2  # one per epoch


def test_default_root_dir_is_refused_where_the_logger_decides(tiny_sinwave, in_tmp):
    with pytest.raises(ValueError, match="--trainer.logger.init_args.save_dir DIR instead"):
        TitansCLI(["fit", *tiny_sinwave, "--trainer.default_root_dir", "elsewhere"])
    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "1",
                     "--trainer.logger.init_args.save_dir", "elsewhere"])
    assert Path(cli.trainer.log_dir).parts[0] == "elsewhere"


def test_help_lists_the_shipped_datamodules(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "datamodules.SinwaveDataModule" in out and "datamodules.WeatherDataModule" in out


def test_the_optimizer_is_configurable_the_lightningcli_way(tiny_sinwave, in_tmp):
    one = ["fit", *tiny_sinwave, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]
    cli = TitansCLI(one)
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == 1e-3
    cli = TitansCLI([*one, "--optimizer", "AdamW", "--optimizer.lr", "0.01",
                     "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"])
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["initial_lr"] == 0.01
    with pytest.raises(ValueError, match="give the learning rate as --optimizer.lr"):
        TitansCLI([*one, "--optimizer", "AdamW", "--model.lr", "0.01"])


def test_test_and_predict_write_into_the_checkpoints_run_folder(tiny_sinwave, in_tmp):
    ckpt = fit_tiny(tiny_sinwave, "--trainer.limit_train_batches", "2") \
        .trainer.checkpoint_callback.last_model_path
    run = Path(ckpt).parents[1]
    fit_config = (run / "config.yaml").read_text()
    tested = TitansCLI(["test", *tiny_sinwave, "--ckpt_path", ckpt])
    TitansCLI(["predict", *tiny_sinwave, "--ckpt_path", ckpt])
    assert Path(tested.trainer.log_dir) == run
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]  # no new run folder
    assert (run / "config.yaml").read_text() == fit_config  # the fit's, kept
    assert (run / "config_test.yaml").is_file() and (run / "predictions.csv").is_file()
    scores = json.loads((run / "test.json").read_text())
    assert scores["status"] == "ok" and scores["ckpt_path"] == ckpt
    assert scores["test_mse"] == pytest.approx(float(tested.trainer.callback_metrics["test/mse"]))

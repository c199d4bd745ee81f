"""Resuming a fit: exactly where an uninterrupted fit would be, in the same run folder, with the
same best epoch and test MSE, also after a SIGKILL mid-epoch or during the final test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans_lightning.cli import TitansCLI

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = "titans_default-shared-reference-seed0"  # the tiny sinwave run's folder, after N
FIVE_EPOCHS = ["--trainer.max_epochs", "5"]  # tiny run: best val/mse at epoch 2, then worse


def last_checkpoint(cli: TitansCLI) -> dict:
    path = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert path.name == "last.ckpt"
    return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resumed_fit_matches_an_uninterrupted_one(tiny_sinwave, in_tmp):
    straight = last_checkpoint(TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2"]))
    first_epoch = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1"])
    resumed = last_checkpoint(TitansCLI([
        "fit", *tiny_sinwave, "--trainer.max_epochs", "2",
        "--ckpt_path", first_epoch.trainer.checkpoint_callback.last_model_path]))

    assert straight["epoch"] == resumed["epoch"] == 1
    assert straight["global_step"] == resumed["global_step"]
    state = straight["state_dict"]
    memory = [name for name in state if ".memory." in name]
    assert any(name.endswith("memory.fast_weights") for name in memory)
    assert any(".strategy_state." in name for name in memory)
    assert int(state["model.layers.0.memory.num_updates"]) > 0
    assert_same_tensors(state, resumed["state_dict"])
    for a, b in zip(straight["optimizer_states"], resumed["optimizer_states"]):
        for param in a["state"]:
            assert_same_tensors(a["state"][param], b["state"][param])


def killed_fit(args: list[str], kill: str) -> subprocess.CompletedProcess:
    """``titans fit`` in a child process that SIGKILLs itself (``kill``: KillAt's init_args)."""
    callback = json.dumps({"class_path": "tests.kill_switch.KillAt", "init_args": json.loads(kill)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "titans_lightning.cli", "fit", *args,
         f"--trainer.callbacks+={callback}"],
        capture_output=True, text=True, timeout=600, env=env)


def result_of(cli: TitansCLI) -> dict:
    return json.loads((Path(cli.trainer.log_dir) / "result.json").read_text())


@pytest.mark.parametrize("kill", ['{"step": 13}', '{"at_test": true}'],
                         ids=["mid-epoch", "during-final-test"])
def test_a_killed_fit_resumes_in_its_folder_and_reports_what_an_uninterrupted_one_does(
        tiny_sinwave, in_tmp, kill):
    straight = result_of(TitansCLI(["fit", *tiny_sinwave, *FIVE_EPOCHS]))  # version_0
    assert straight["best_epoch"] == 2  # so that a lost best score would test epoch 3 or 4

    run = killed_fit([*tiny_sinwave, *FIVE_EPOCHS], kill)  # version_1, killed
    assert run.returncode == -9, run.stderr[-2000:]
    folder = in_tmp / "logs" / "sinwave" / f"version_1-{DEFAULT_RUN}"
    assert not (folder / "result.json").exists()
    resumed_cli = TitansCLI(["fit", *tiny_sinwave, *FIVE_EPOCHS,
                             "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])

    assert Path(resumed_cli.trainer.log_dir).resolve() == folder.resolve()
    assert sorted(p.name for p in (in_tmp / "logs" / "sinwave").iterdir()) == \
        [f"version_0-{DEFAULT_RUN}", f"version_1-{DEFAULT_RUN}"]
    resumed = result_of(resumed_cli)
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["val_mse"] == pytest.approx(straight["val_mse"], rel=1e-6)
    assert resumed["test_mse"] == pytest.approx(straight["test_mse"], rel=1e-6)
    assert resumed["status"] == "ok"
    # the curve has every epoch, the killed attempt's ones from its last checkpoint
    assert [e["epoch"] for e in resumed["curve"]] == [e["epoch"] for e in straight["curve"]] \
        == [0, 1, 2, 3, 4]
    for key in ("train_loss", "val_mse"):
        assert [e[key] for e in resumed["curve"]] == \
            pytest.approx([e[key] for e in straight["curve"]], rel=1e-6), key
    # the record's wall time counts the killed attempt's epochs too (up to its last checkpoint)
    assert resumed["wall_s"] > torch.load(folder / "checkpoints" / "last.ckpt",
                                          weights_only=True)["fit_wall_s"] > 0


def test_a_resume_finds_its_best_score_after_the_run_folder_moved(tiny_sinwave, in_tmp):
    TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "3"])
    (in_tmp / "logs").rename(in_tmp / "moved")
    run = f"moved/sinwave/version_0-{DEFAULT_RUN}"
    cli = TitansCLI(["fit", *tiny_sinwave, *FIVE_EPOCHS, "--ckpt_path",
                     f"{run}/checkpoints/last.ckpt"])
    callback = cli.trainer.checkpoint_callback
    assert Path(callback.dirpath).resolve() == (in_tmp / run / "checkpoints")
    assert result_of(cli)["best_epoch"] == 2
    assert Path(callback.best_model_path).parent == Path(callback.dirpath)


def test_a_checkpoint_outside_a_run_folder_resumes_into_a_new_one(tiny_sinwave, in_tmp):
    first = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1"])
    loose = in_tmp / "loose.ckpt"
    loose.write_bytes(Path(first.trainer.checkpoint_callback.last_model_path).read_bytes())
    with pytest.warns(UserWarning, match="this run logs to a new run folder"):
        cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2",
                         "--ckpt_path", str(loose)])
    assert Path(cli.trainer.log_dir).name == f"version_1-{DEFAULT_RUN}"
    assert result_of(cli)["status"] == "ok"


@pytest.mark.parametrize("setting", [
    ["--model.strategy", "adam_gated"],
    ["--model.strategy", "meta_nlms", "--model.memory_scope", "per_sequence"],
    ["--model.eval_protocol", "reference", "--data.init_args.shuffle_eval", "true"],
], ids=["adam_gated", "meta_nlms-per_sequence", "reference-protocol"])
def test_resume_matrix_killed_mid_epoch(tiny_sinwave, in_tmp, setting):
    """Other rules (a gate's running statistics, a differentiable rule's learned state), the
    per-sequence scope and the reference protocol (dropout on while scoring, shuffled
    evaluation) resume to the same record and the same last checkpoint."""
    args = [*tiny_sinwave, "--trainer.max_epochs", "3", *setting]
    straight_cli = TitansCLI(["fit", *args])
    straight = result_of(straight_cli)
    run = killed_fit(args, '{"step": 6}')  # epoch 1, batch 2
    assert run.returncode == -9, run.stderr[-2000:]
    (folder,) = (in_tmp / "logs" / "sinwave").glob("version_1-*")  # named by the setting
    resumed_cli = TitansCLI(["fit", *args, "--ckpt_path",
                             str(folder / "checkpoints" / "last.ckpt")])
    resumed = result_of(resumed_cli)
    for key in ("best_epoch", "val_mse", "test_mse", "test_mae"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key
    assert_same_tensors(last_checkpoint(straight_cli)["state_dict"],
                        last_checkpoint(resumed_cli)["state_dict"])


def test_without_a_run_folder_logger_ckpt_path_last_resumes_from_the_checkpoints_folder(
        tiny_sinwave, in_tmp):
    """With no TensorBoard or CSV logger, checkpoints go to default_root_dir/checkpoints/, where
    Lightning's ``last`` finds them: that resume is not refused (with a run-folder logger it
    is, since a new run folder would hold nothing)."""
    no_logger = [*tiny_sinwave, "--trainer.logger", "false"]
    straight = TitansCLI(["fit", *no_logger, "--trainer.max_epochs", "2",
                          "--trainer.default_root_dir", "straight"])
    TitansCLI(["fit", *no_logger, "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", "resumed"])
    resumed = TitansCLI(["fit", *no_logger, "--trainer.max_epochs", "2",
                         "--trainer.default_root_dir", "resumed", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == straight.trainer.global_step == 8  # not from scratch
    assert_same_tensors(last_checkpoint(straight)["state_dict"],
                        last_checkpoint(resumed)["state_dict"])
    assert json.loads(Path("resumed/result.json").read_text())["test_mse"] \
        == json.loads(Path("straight/result.json").read_text())["test_mse"]


@pytest.mark.parametrize("subcommand, logger", [
    ("fit", []), ("fit", ["--trainer.logger", "true"]),
    ("test", []), ("validate", []), ("predict", [])])
def test_ckpt_path_last_that_would_find_a_new_run_folder_is_refused(tiny_sinwave, in_tmp,
                                                                    subcommand, logger):
    """A new version_N (the shipped loggers, Lightning's own with ``logger: true``, a W&B run)
    holds no checkpoint: Lightning would warn, then train or score untrained weights."""
    TitansCLI(["fit", *tiny_sinwave, *logger, "--trainer.max_epochs", "1"])
    made = sorted(in_tmp.rglob("*"))
    with pytest.raises(ValueError, match="--ckpt_path last finds no last checkpoint.*"
                                         "RUN/checkpoints/last.ckpt"):
        TitansCLI([subcommand, *tiny_sinwave, *logger, "--ckpt_path", "last"])
    assert sorted(in_tmp.rglob("*")) == made  # no run folder left behind


def test_a_resumed_runs_saved_config_makes_a_new_run(tiny_sinwave, in_tmp):
    first = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1"])
    run = Path(first.trainer.log_dir)
    resumed = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2",
                         "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert Path(resumed.trainer.log_dir) == run
    again = TitansCLI(["fit", "--config", str(run / "config.yaml")])
    assert Path(again.trainer.log_dir) == run.parent / f"version_1-{DEFAULT_RUN}"
    assert again.trainer.global_step == resumed.trainer.global_step  # from the start, 2 epochs
    assert result_of(again)["test_mse"] == pytest.approx(result_of(resumed)["test_mse"],
                                                         rel=1e-6)


@pytest.mark.parametrize("folder", [["--trainer.logger", "false", "--trainer.default_root_dir",
                                      "job"],
                                     ["--trainer.logger.init_args.version", "job"]],
                         ids=["no-logger", "a-version"])
def test_ckpt_path_last_in_a_folder_the_user_fixed_is_the_set_and_forget_resume(tiny_sinwave,
                                                                                 in_tmp, folder):
    """A requeued job passes ``last`` every time: its first attempt, in an empty folder it
    named, trains from the start (Lightning warns), and the next one resumes there."""
    fixed = [*tiny_sinwave, *folder, "--ckpt_path", "last"]
    with pytest.warns(UserWarning, match="no last checkpoint available"):
        first = TitansCLI(["fit", *fixed, "--trainer.max_epochs", "1"])
    assert first.trainer.global_step == 4
    again = TitansCLI(["fit", *fixed, "--trainer.max_epochs", "2"])
    assert again.trainer.global_step == 8  # went on from the first attempt's last checkpoint


def test_runs_of_a_logger_without_run_folders_keep_their_records_apart(tiny_sinwave, in_tmp):
    """A W&B- or MLflow-like logger's save_dir is shared by every run: each run's result.json
    and test.json go next to its own checkpoints (save_dir/name/version), not into save_dir."""
    logger = ["--trainer.logger", '{"class_path": "tests.shared_dir_logger.SharedDirLogger", '
                                  '"init_args": {"save_dir": "shared"}}']
    runs = [TitansCLI(["fit", *tiny_sinwave, *logger, "--trainer.max_epochs", str(epochs)])
            for epochs in (1, 2)]
    folders = [Path("shared") / "project" / cli.trainer.logger.version for cli in runs]
    assert folders[0] != folders[1] and not Path("shared/result.json").exists()
    for epochs, cli, folder in zip((1, 2), runs, folders):
        assert Path(cli.trainer.checkpoint_callback.best_model_path).parent.parent == folder
        result = json.loads((folder / "result.json").read_text())
        assert result["config"]["trainer"]["max_epochs"] == epochs
    TitansCLI(["test", *tiny_sinwave, *logger, "--ckpt_path",
               runs[1].trainer.checkpoint_callback.best_model_path])
    assert len(list(Path("shared/project").glob("*/test.json"))) == 1


def test_resuming_a_checkpoint_without_a_curve_says_the_curve_is_short(tiny_sinwave, in_tmp):
    first = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1"])
    path = Path(first.trainer.checkpoint_callback.last_model_path)
    checkpoint = torch.load(path, weights_only=True)
    assert [e["epoch"] for e in checkpoint.pop("curve")] == [0]
    torch.save(checkpoint, path)  # as an older version of the package wrote it
    with pytest.warns(UserWarning, match="holds no learning curve"):
        resumed = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2",
                             "--ckpt_path", str(path)])
    assert [e["epoch"] for e in result_of(resumed)["curve"]] == [1]

"""Run folders named by what ran: ``version_N-<strategy>-<scope>-<order>-seed<S>``, numbered after
every folder beside them, a chosen version kept, a checkpoint's folder reused whatever its name,
one folder for every rank of a DDP fit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from titans_lightning import run_names
from titans_lightning.cli import TitansCLI

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "titans_default-shared-reference-seed0"  # the shipped sinwave config's run
ONE_BATCH = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
             "--trainer.limit_test_batches", "1"]


def log_dirs(args: list[str]) -> list[str]:
    """The folders the loggers of a ``titans`` command (not run) would write."""
    cli = TitansCLI([*args], run=False)
    return [logger.log_dir for logger in cli.trainer.loggers]


def test_a_new_run_folder_says_what_ran(tiny_sinwave, in_tmp):
    assert log_dirs(tiny_sinwave) == [str(Path("logs/sinwave") / f"version_0-{DEFAULT}")] * 2
    other = log_dirs([*tiny_sinwave, "--model.strategy", "meta_nlms", "--model.memory_scope",
                      "per_sequence", "--model.mac_order", "causal", "--seed_everything", "7"])
    assert {Path(d).name for d in other} == {"version_0-meta_nlms-per_sequence-causal-seed7"}


def test_the_folder_is_named_after_the_first_config_not_an_override_after_it(tiny_sinwave,
                                                                            in_tmp):
    override = in_tmp / "fewer_epochs.yaml"
    override.write_text("trainer:\n  max_epochs: 1\n")
    (folder, _) = log_dirs([*tiny_sinwave, "--config", str(override)])
    assert Path(folder).parent == Path("logs/sinwave")


def test_a_strategy_file_is_named_by_its_stem(tiny_sinwave, in_tmp):
    rule = in_tmp / "rules" / "my_rule.py"
    rule.parent.mkdir()
    shutil.copy(REPO / "examples" / "custom_memory.py", rule)
    (folder, _) = log_dirs([*tiny_sinwave, "--model.strategy", str(rule)])
    assert Path(folder).name == "version_0-my_rule-shared-reference-seed0"
    assert run_names.strategy_label("mypackage.rules.nlms") == "nlms"


def test_the_number_follows_old_and_new_folders_alike(tiny_sinwave, in_tmp):
    root = in_tmp / "logs" / "sinwave"
    for name in ("version_0", "version_3", "version_4-adam_gated-shared-causal-seed1",
                 "version_x", "version_9abc", "mine"):
        (root / name).mkdir(parents=True)
    (root / "version_12").write_text("")  # a file, not a run folder
    (folder, _) = log_dirs(tiny_sinwave)
    assert Path(folder).name == f"version_5-{DEFAULT}"


def test_a_given_version_is_kept(tiny_sinwave, in_tmp):
    (folder, _) = log_dirs([*tiny_sinwave, "--trainer.logger.init_args.version", "mine"])
    assert Path(folder).name == "mine"
    (folder, _) = log_dirs([*tiny_sinwave, "--trainer.logger.init_args.version", "3"])
    assert Path(folder).name == "version_3"  # Lightning's own name for a number


def test_a_resume_and_a_test_stay_in_the_checkpoints_folder_whatever_its_name(tiny_sinwave,
                                                                            in_tmp):
    first = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1", *ONE_BATCH])
    run = Path(first.trainer.log_dir)
    assert run.name == f"version_0-{DEFAULT}"
    resumed = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2", *ONE_BATCH,
                         "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert Path(resumed.trainer.log_dir) == run
    old = run.rename(run.parent / "version_0")  # a run folder named before runs said what ran
    tested = TitansCLI(["test", *tiny_sinwave, *ONE_BATCH,
                        "--ckpt_path", str(old / "checkpoints" / "last.ckpt")])
    assert Path(tested.trainer.log_dir) == old and (old / "test.json").is_file()
    assert [p.name for p in old.parent.iterdir()] == ["version_0"]  # no new folder


def test_a_runs_saved_config_makes_a_new_run_and_scores_in_the_checkpoints_folder(tiny_sinwave,
                                                                                  in_tmp):
    first = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1", *ONE_BATCH])
    run = Path(first.trainer.log_dir)
    saved = run / "config.yaml"
    assert "version_0" not in saved.read_text()  # the folder chosen, not the config given
    assert json.loads((run / "result.json").read_text())["config"]["trainer"]["logger"][-1][
        "init_args"]["version"] is None
    with pytest.raises(ValueError, match="RUN/checkpoints/last.ckpt"):  # not a silent restart
        TitansCLI(["fit", "--config", str(saved), "--ckpt_path", "last"])
    again = TitansCLI(["fit", "--config", str(saved)])  # the same run, made again
    assert Path(again.trainer.log_dir) == run.parent / f"version_1-{DEFAULT}"
    assert json.loads((Path(again.trainer.log_dir) / "result.json").read_text())["test_mse"] \
        == json.loads((run / "result.json").read_text())["test_mse"]
    tested = TitansCLI(["test", "--config", str(saved),
                        "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert Path(tested.trainer.log_dir) == run and (run / "test.json").is_file()
    scoring = yaml.safe_load((run / "config_test.yaml").read_text())
    assert [logger["init_args"]["version"] for logger in scoring["trainer"]["logger"]] == [None] * 2
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name, f"version_1-{DEFAULT}"]


def test_ranks_launched_by_rank_zero_take_its_version_and_no_other_process_does(monkeypatch,
                                                                              tmp_path):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(run_names.LAUNCHED_VERSION, "")  # put back afterwards
    first = run_names.new_run_version(tmp_path, "titans_default", "shared", "reference", 0)
    assert first == f"version_0-{DEFAULT}"
    (tmp_path / first).mkdir()
    # a later run of the same process (rank 0) looks again
    assert run_names.new_run_version(tmp_path, "titans_default", "shared", "reference", 0) \
        == f"version_1-{DEFAULT}"
    # a rank that this process launched takes its choice (the last one)
    monkeypatch.setattr(os, "getppid", lambda: os.getpid())
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_names.new_run_version(tmp_path, "adam_gated", "shared", "causal", 3) \
        == f"version_1-{DEFAULT}"
    # ...but not a process that another one launched
    monkeypatch.setattr(os, "getppid", lambda: os.getpid() + 1)
    assert run_names.new_run_version(tmp_path, "adam_gated", "shared", "causal", 3) \
        == "version_1-adam_gated-shared-causal-seed3"


def test_every_rank_of_a_ddp_fit_logs_to_rank_zeros_folder(tiny_sinwave, in_tmp):
    """Two CPU processes, the second started by Lightning running the command again; between
    rank 0 naming the folder and rank 1 starting, another run's folder appears."""
    probe = json.dumps({"class_path": "tests.run_folder_probe.CompetingRunAndRankFolders",
                        "init_args": {"root": str(in_tmp / "logs" / "sinwave"),
                                      "record": str(in_tmp / "ranks")}})
    env = {name: value for name, value in os.environ.items()
           if name not in ("LOCAL_RANK", run_names.LAUNCHED_VERSION)}
    run = subprocess.run(
        [sys.executable, "-m", "titans_lightning.cli", "fit", *tiny_sinwave,
         "--trainer.max_epochs", "1", *ONE_BATCH, "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.strategy", "ddp",
         f"--trainer.callbacks+={probe}"],
        capture_output=True, text=True, timeout=600,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    folders = [(in_tmp / "ranks" / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert folders == [str(Path("logs") / "sinwave" / f"version_0-{DEFAULT}")] * 2
    assert (in_tmp / "logs" / "sinwave" / f"version_0-{DEFAULT}" / "result.json").is_file()
    assert sorted(p.name for p in (in_tmp / "logs" / "sinwave").iterdir()) == \
        [f"version_0-{DEFAULT}", "version_5-another_run"]


def test_a_resume_points_only_the_folder_loggers_at_the_run_folder():
    """A W&B or MLflow logger's name and version are its project's run name and id: a resume
    must not write the TensorBoard folder's version into them."""
    from jsonargparse import Namespace

    from titans_lightning.cli import continue_in_run_folder

    def logger(class_path: str, **init_args) -> Namespace:
        return Namespace(class_path=class_path, init_args=Namespace(**init_args))

    loggers = [logger("lightning.pytorch.loggers.TensorBoardLogger", save_dir="logs",
                      name="other", version=None),
               logger("lightning.pytorch.loggers.WandbLogger", save_dir="wandb", name="mine",
                      version="abc123", project="titans"),
               logger("lightning.pytorch.loggers.MLFlowLogger", save_dir="./mlruns",
                      run_name="mine", experiment_name="titans")]
    config = Namespace(trainer=Namespace(logger=loggers))
    continue_in_run_folder(config, "runs/sinwave/version_3-x/checkpoints/last.ckpt")
    tensorboard, wandb, mlflow = (lg.init_args for lg in loggers)
    assert (tensorboard.save_dir, tensorboard.name, tensorboard.version) == (
        "runs", "sinwave", "version_3-x")
    assert (wandb.save_dir, wandb.name, wandb.version) == ("wandb", "mine", "abc123")
    assert mlflow == Namespace(save_dir="./mlruns", run_name="mine", experiment_name="titans")

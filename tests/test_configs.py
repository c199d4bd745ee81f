"""The shipped configs: a base that every subcommand reads first (titans_lightning/base.yaml) and
one file per benchmark holding only what differs; resolved, they are the published protocol."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from titans_lightning.cli import BASE_CONFIG, TRAINER_DEFAULTS, TitansCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROTOCOL = {"sinwave.yaml": (16, 20), "weather.yaml": (16, 20), "sinwave_long.yaml": (32, 30)}
LOGGERS = ["lightning.pytorch.loggers.TensorBoardLogger", "callbacks.csv_logger.RunCSVLogger"]
CALLBACKS = ["lightning.pytorch.callbacks.ModelCheckpoint",
             "callbacks.surprise_statistics.SurpriseStatistics", "callbacks.gate_rate.GateRate",
             "callbacks.memory_health.MemoryHealth", "callbacks.memory_profile.MemoryProfile",
             "callbacks.custom_scalars.CustomScalars", "callbacks.forecast_figure.ForecastFigure"]
TINY = ["--model.dim_feedforward", "32", "--data.init_args.n_sequences", "20",
        "--data.init_args.seq_len", "40", "--model.context_window", "4"]


def settings(path: Path) -> dict[str, str]:
    """A YAML file's leaves by dotted key, each value as JSON (a list is one leaf: a later
    config replaces it whole)."""
    def leaves(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", json.dumps(value)
    return dict(leaves(yaml.safe_load(path.read_text()), ""))


def resolved(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as done:
        TitansCLI([*args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_base_starts_with_a_command_and_instantiates_alone(in_tmp):
    assert BASE_CONFIG.read_text().startswith("# titans ")

    cli = TitansCLI(["--data", "datamodules.SinwaveDataModule", *TINY], run=False)

    assert cli.config["seed_everything"] == 0
    chosen = {f"{type(c).__module__}.{type(c).__name__}" for c in cli.trainer.callbacks}
    assert set(CALLBACKS[1:]) <= chosen and cli.trainer.checkpoint_callback.monitor == "val/mse"
    assert [f"{type(lg).__module__}.{type(lg).__name__}" for lg in cli.trainer.loggers] == [
        "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
        "callbacks.csv_logger.RunCSVLogger"]
    # no --config to name the run after: it goes straight into the save_dir
    assert {Path(lg.log_dir).parent for lg in cli.trainer.loggers} == {Path("logs")}


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_a_benchmark_file_repeats_nothing_of_the_base_nor_of_the_cli(name):
    own = settings(CONFIGS / name)
    assert not set(own) & set(settings(BASE_CONFIG))
    assert not set(own) & {f"trainer.{key}" for key in TRAINER_DEFAULTS}


def test_no_setting_is_the_same_in_every_benchmark_file():
    """Such a setting would belong to the base."""
    files = [set(settings(CONFIGS / name).items()) for name in PROTOCOL]
    assert set.intersection(*files) == set()


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_the_resolved_config_is_the_published_protocol(name, subcommand, capsys, in_tmp):
    config = resolved(capsys, subcommand, "--config", str(CONFIGS / name))

    window, epochs = PROTOCOL[name]
    model, data, trainer = config["model"], config["data"]["init_args"], config["trainer"]
    assert (model["context_window"], trainer["max_epochs"]) == (window, epochs)  # data's: linked
    assert (model["strategy"], model["memory_scope"], model["lr"]) == \
        ("titans_default", "shared", 1e-3)
    assert data["batch_size"] == 4 and config["seed_everything"] == 0
    assert trainer["inference_mode"] is False and trainer["num_sanity_val_steps"] == 0
    loggers, callbacks = trainer["logger"], trainer["callbacks"]
    assert [lg["class_path"] for lg in loggers] == LOGGERS
    assert {(lg["init_args"]["save_dir"], lg["init_args"]["name"]) for lg in loggers} == \
        {("logs", None)}  # named at instantiation, after the config file
    assert loggers[0]["init_args"]["default_hp_metric"] is False
    assert [c["class_path"] for c in callbacks] == CALLBACKS
    checkpoint = callbacks[0]["init_args"]
    assert (checkpoint["monitor"], checkpoint["mode"], checkpoint["save_top_k"],
            checkpoint["save_last"]) == ("val/mse", "min", 1, True)
    assert callbacks[-1]["init_args"]["sequences"] == [0, 1, 2]


def test_a_run_is_named_after_the_first_config_file(in_tmp):
    mine = in_tmp / "mine.yaml"
    shutil.copy(CONFIGS / "sinwave.yaml", mine)
    for configs, run in (([mine], "mine"), ([CONFIGS / "sinwave.yaml", mine], "sinwave"),
                         ([mine, CONFIGS / "sinwave.yaml"], "mine")):
        cli = TitansCLI([arg for c in configs for arg in ("--config", str(c))], run=False)
        assert [lg.name for lg in cli.trainer.loggers] == [run, run]
        # what config.yaml and result.json record
        assert [lg.init_args.name for lg in cli.config.trainer.logger] == [run, run]


def test_own_loggers_and_callbacks_replace_the_bases(in_tmp):
    config = ["--config", str(CONFIGS / "sinwave.yaml"), *TINY]
    own = TitansCLI([*config, "--trainer.logger", json.dumps({
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "tb"}}), "--trainer.callbacks", json.dumps([{
            "class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/mse"}}])], run=False)
    assert [type(lg).__name__ for lg in own.trainer.loggers] == ["TensorBoardLogger"]
    assert own.trainer.logger.log_dir.startswith(str(Path("tb") / "lightning_logs"))
    ours = {type(c).__module__ for c in own.trainer.callbacks if type(c).__module__
            .startswith("callbacks.")}
    assert ours == set() and any(isinstance(c, EarlyStopping) for c in own.trainer.callbacks)
    assert all(c.monitor is None for c in own.trainer.callbacks  # Lightning's own checkpoint
               if isinstance(c, ModelCheckpoint))

    appended = TitansCLI([*config, "--trainer.callbacks+=lightning.pytorch.callbacks."
                                   "LearningRateMonitor"], run=False)
    assert len(appended.config.trainer.callbacks) == len(CALLBACKS) + 1

    assert TitansCLI([*config, "--trainer.logger", "false"], run=False).trainer.loggers == []

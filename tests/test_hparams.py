"""TensorBoard's HParams tab compares runs: the settings that tell runs apart, with the real
scores (best val/mse, test/mse), no placeholder ``hp_metric`` and no internal keys."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from titans_lightning.cli import TitansCLI


def hparams_sessions(run: Path) -> tuple[list[dict], list[str], EventAccumulator]:
    events = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    sessions, metrics = [], []
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            sessions.append({k: v.ListFields()[0][1]
                             for k, v in data.session_start_info.hparams.items()})
        if data.HasField("experiment"):
            metrics += [m.name.tag for m in data.experiment.metric_infos]
    return sessions, metrics, events


def test_the_hparams_tab_holds_the_settings_and_the_scores(tiny_sinwave, in_tmp):
    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "2",
                     "--trainer.limit_train_batches", "2", "--model.strategy", "adam_gated",
                     "--model.memory_scope", "per_sequence", "--seed_everything", "3"])
    run = Path(cli.trainer.log_dir)
    result = json.loads((run / "result.json").read_text())
    sessions, metrics, events = hparams_sessions(run)
    assert len(sessions) == 1  # one session, written once the scores exist
    (session,) = sessions
    assert session["strategy"] == "adam_gated" and session["memory_scope"] == "per_sequence"
    assert session["seed"] == 3 and session["max_epochs"] == 2
    assert session["mac_order"] == "reference" and session["benchmark"] == "SinwaveDataModule"
    assert not any(key.startswith("_") for key in session)  # no _instantiator
    assert sorted(metrics) == ["hp/epoch_tested", "hp/test_mse", "hp/val_mse"]
    scalars = events.Tags()["scalars"]
    assert "hp_metric" not in scalars
    assert events.Scalars("hp/test_mse")[-1].value == float(result["test_mse"])
    assert events.Scalars("hp/val_mse")[-1].value == float(result["val_mse"])
    saved = yaml.safe_load((run / "hparams.yaml").read_text())  # the module's and data's own
    assert "_instantiator" not in saved and "benchmark" not in saved
    assert saved["strategy"] == "adam_gated" and saved["strategy_options"] is None
    assert saved["seed"] == cli.datamodule.hparams.seed  # the data's seed, not seed_everything
    table = pd.read_csv(run / "metrics.csv")  # the CSV logger gets the scores too
    assert table["hp/test_mse"].dropna().iloc[-1] == float(result["test_mse"])


def test_scoring_a_checkpoint_another_way_leaves_the_runs_hyperparameters(tiny_sinwave, in_tmp):
    cli = TitansCLI(["fit", *tiny_sinwave, "--trainer.max_epochs", "1"])
    run = Path(cli.trainer.log_dir)
    trained = (run / "hparams.yaml").read_text()
    assert yaml.safe_load(trained)["eval_protocol"] == "default"
    TitansCLI(["test", *tiny_sinwave, "--model.eval_protocol", "reference",
               "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert json.loads((run / "test.json").read_text())["config"]["model"]["eval_protocol"] == \
        "reference"  # the test wrote into the run's folder
    assert (run / "hparams.yaml").read_text() == trained

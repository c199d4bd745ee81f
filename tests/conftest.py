"""Fixtures for the module, CLI and resume tests: tiny runs of the shipped configs."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

# The test models are tiny: one thread is as fast, and far faster on a busy machine, where
# threads of the same small kernels wait on each other.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The published arrays live outside the repository (never vendored): <repo>/../shared/data.
SHARED_DATA = REPO.parent / "shared" / "data"

# A sinwave run small enough for a test: 16 / 2 / 2 sequences of 40 steps, window 4, and a
# narrow feed-forward. A batch then makes 10 memory updates per layer (37 windows, groups of 4).
TINY = {"seq_len": 40, "window": 4, "test_sequences": 2, "updates_per_batch": 10}
TINY_SINWAVE = [
    "--config", str(CONFIGS / "sinwave.yaml"),
    "--model.dim_feedforward", "32", "--model.context_window", str(TINY["window"]),
    "--data.init_args.n_sequences", "20", "--data.init_args.seq_len", str(TINY["seq_len"]),
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1",
]


def shipped_config_args(name: str) -> list[str]:
    """``--config`` for a shipped YAML, plus what makes it runnable from any folder."""
    args = ["--config", str(CONFIGS / name)]
    if name == "weather.yaml":
        directory = SHARED_DATA / "weather"
        if not all((directory / f"{s}.npy").is_file() for s in ("train", "valid", "test")):
            pytest.skip(f"published weather arrays not found in {directory} (outside the checkout)")
        args += ["--data.init_args.data_dir", str(directory)]
    return args


@pytest.fixture(autouse=True)
def quiet_lightning():
    """Lightning's advice about dataloader workers and logging intervals is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*dirpath has changed.*")
        # the tiny splits hold fewer sequences than the shipped configs ask figures of
        warnings.filterwarnings("ignore", message=".*were not seen.*")
        yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, so that runs write their logs/ there, with no stray argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["titans"])
    return tmp_path


@pytest.fixture
def tiny() -> dict[str, int]:
    """Sizes of the tiny sinwave run."""
    return dict(TINY)


@pytest.fixture
def tiny_sinwave() -> list[str]:
    """CLI arguments (after the subcommand) for the tiny sinwave run."""
    return list(TINY_SINWAVE)


@pytest.fixture
def config_args():
    """Function ``name -> ["--config", ...]`` for a shipped YAML (skips if its data is absent)."""
    return shipped_config_args

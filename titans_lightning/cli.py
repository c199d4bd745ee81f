"""The ``titans`` command: LightningCLI over :class:`TitansForecaster` and any datamodule.

    titans fit --config configs/sinwave.yaml      # train, then test the best checkpoint
    titans test --config configs/sinwave.yaml --ckpt_path logs/sinwave/version_0/checkpoints/last.ckpt
    titans predict --config configs/sinwave.yaml --ckpt_path PATH   # writes predictions.csv

``fit`` ends by testing the best-validation checkpoint and writing ``result.json`` into the run's
log directory (keys in :mod:`titans_lightning.results`).
"""
from __future__ import annotations

import json
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from .module import TitansForecaster
from .results import PredictionWriter, device_name, git_commit, write_result

# The memory learns during validation and test, so autograd must stay available there; the
# sanity check is off because it would run the memory on validation data before training.
TRAINER_DEFAULTS = {"inference_mode": False, "num_sanity_val_steps": 0,
                    "use_distributed_sampler": False}  # on several devices: see distributed.py


class TitansCLI(LightningCLI):
    """LightningCLI with the model fixed, any datamodule by class path, and the run record."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any):
        self.fit_started = time.perf_counter()
        super().__init__(
            TitansForecaster, L.LightningDataModule, subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.input_dim", "model.input_dim", apply_on="instantiate")
        parser.link_arguments("data.output_dim", "model.output_dim", apply_on="instantiate")
        parser.link_arguments("model.context_window", "data.init_args.context_window",
                              apply_on="parse")

    def before_fit(self) -> None:
        self.fit_started = time.perf_counter()

    def after_fit(self) -> None:
        """Test the best-validation checkpoint and write ``result.json``."""
        checkpoint = self.trainer.checkpoint_callback
        best_path = getattr(checkpoint, "best_model_path", "")
        fit_state = checkpoint.state_dict() if checkpoint is not None else None
        scores = self.trainer.test(self.model, datamodule=self.datamodule,
                                   ckpt_path="best" if best_path else None)[0]
        if checkpoint is not None:  # loading the best checkpoint rewound the callback to its state
            checkpoint.load_state_dict(fit_state)
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero:
            return
        result = self.fit_result(scores, best_path)
        path = write_result(log_dir, result)
        tested = f"best epoch {result['best_epoch']}" if best_path else "final weights"
        if result["val_mse"] is not None:
            tested += f", val MSE {result['val_mse']:.6f}"
        print(f"\ntest MSE {result['test_mse']:.6f}  ({tested})\nresult: {path}")

    def fit_result(self, scores: dict[str, float], best_path: str) -> dict[str, Any]:
        checkpoint = self.trainer.checkpoint_callback
        monitors_val_mse = best_path and checkpoint.monitor == "val/mse"
        hparams = self.model.hparams
        return {
            "config": self.config_as_dict(),
            "commit": git_commit(),
            "seed": self.config["fit"]["seed_everything"],
            "wall_s": round(time.perf_counter() - self.fit_started, 3),
            "best_epoch": checkpoint_epoch(best_path) if best_path else None,
            "val_mse": float(checkpoint.best_model_score) if monitors_val_mse else None,
            "test_mse": scores["test/mse"],
            "test_mae": scores["test/mae"],
            "strategy": hparams.strategy,
            "memory_scope": hparams.memory_scope,
            "device": device_name(self.trainer),
        }

    def config_as_dict(self) -> dict[str, Any]:
        """The parsed config, with the values linked from the datamodule at instantiation."""
        dumped = self.parser.dump(self.config, skip_link_targets=False, skip_none=False,
                                  format="json")
        config = json.loads(dumped)[self.subcommand]
        config["model"].update(input_dim=self.model.hparams.input_dim,
                               output_dim=self.model.hparams.output_dim)
        return config

    def before_predict(self) -> None:
        if not any(isinstance(c, PredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionWriter) and self.trainer.is_global_zero:
                print(f"predictions: {callback.path}")


def checkpoint_epoch(path: str) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def main(args: ArgsType = None) -> None:
    TitansCLI(args)


if __name__ == "__main__":
    main()

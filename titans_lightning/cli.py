"""The ``titans`` command: LightningCLI over :class:`TitansForecaster` and any datamodule.

    titans fit --config configs/sinwave.yaml      # train, then test the best checkpoint
    titans test --config configs/sinwave.yaml --ckpt_path RUN/checkpoints/last.ckpt
    titans predict --config configs/sinwave.yaml --ckpt_path PATH   # writes predictions.csv

A new run gets its own folder, named by its number and what it runs, e.g.
``RUN = logs/sinwave/version_0-titans_default-shared-reference-seed0`` (strategy, memory scope,
MAC order, seed; :mod:`titans_lightning.run_names`), unless the logger's version is given.
``fit`` ends by testing the best-validation checkpoint and writing ``result.json`` into the run's
log directory (keys in :mod:`titans_lightning.results`). ``fit --ckpt_path RUN/checkpoints/X.ckpt``
resumes that run: it continues in the same folder ``RUN`` (same logger version), with the
checkpoint callback's best score, so the epoch tested at the end is the one an uninterrupted fit
would have tested. With the progress bar off, every validated epoch prints one line (epoch,
losses, best validation MSE, time per epoch and ETA).
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import (ArgsType, LightningArgumentParser, LightningCLI,
                                   SaveConfigCallback)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

import datamodules  # noqa: F401  (so that --help lists the shipped datamodules)

from . import __version__
from .module import TitansForecaster
from .run_names import new_run_version
from .strategy import strategy_source
from .results import (TEST_FILE, AtomicCheckpointIO, PredictionWriter, device_name, git_commit,
                      write_result)

# The memory learns during validation and test, so autograd must stay available there; the
# sanity check is off because it would run the memory on validation data before training.
TRAINER_DEFAULTS = {"inference_mode": False, "num_sanity_val_steps": 0,
                    "use_distributed_sampler": False}  # on several devices: see distributed.py
# What the benchmark configs share (seed, loggers, callbacks): every subcommand reads it first.
BASE_CONFIG = Path(__file__).with_name("base.yaml")


class RunConfig(SaveConfigCallback):
    """Saves the configuration into the run folder: ``config.yaml`` for a fit (without the
    ``ckpt_path`` a resume was given), and ``config_<stage>.yaml`` for a test, validate or
    predict that scores the run's checkpoint in the same folder (so the fit's own configuration
    is never overwritten)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        self.config_filename = "config.yaml" if stage == "fit" else f"config_{stage}.yaml"
        if stage == "fit" and self.config.get("ckpt_path"):  # a resumed fit's: re-running the
            self.config = self.config.clone()                 # saved config makes a new run,
            self.config.ckpt_path = None                      # as a first fit's does
        super().setup(trainer, pl_module, stage)


class Trainer(L.Trainer):
    """Lightning's Trainer, whose ``limit_*_batches`` read from the command line or a config
    keep an integer an integer: ``--trainer.limit_train_batches 1`` is one batch. (Lightning
    annotates them ``Union[float, int]``, so the CLI parsed 1 as 1.0, which Lightning takes as
    the whole split: the argument was silently ignored.)

    Args:
        limit_train_batches: training batches per epoch: an int counts them, a float in
            [0, 1] is the fraction of the split (default: all).
        limit_val_batches: the same for validation.
        limit_test_batches: the same for the test.
        limit_predict_batches: the same for predict.
    """

    def __init__(self, *, limit_train_batches: int | float | None = None,
                 limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None,
                 limit_predict_batches: int | float | None = None, **kwargs: Any):
        limits = {"limit_train_batches": limit_train_batches,
                  "limit_val_batches": limit_val_batches,
                  "limit_test_batches": limit_test_batches,
                  "limit_predict_batches": limit_predict_batches}
        # those not given stay unpassed, so Lightning's PL_TRAINER_LIMIT_* variables still count
        super().__init__(**kwargs, **{k: v for k, v in limits.items() if v is not None})


class TitansCLI(LightningCLI):
    """LightningCLI with the model fixed, any datamodule by class path, and the run record."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any):
        self.fit_started = time.perf_counter()
        self.commit = git_commit()  # the code this process runs, before the checkout moves on
        super().__init__(
            TitansForecaster, L.LightningDataModule, subclass_mode_data=True, trainer_class=Trainer,
            trainer_defaults=TRAINER_DEFAULTS, save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=True, args=args, run=run, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version",
                            version=f"titans-lightning {__version__} (torch {torch.__version__}, "
                                    f"lightning {L.__version__})")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.default_config_files = [str(BASE_CONFIG)]  # before any --config
        parser.link_arguments("data.input_dim", "model.input_dim", apply_on="instantiate")
        parser.link_arguments("data.output_dim", "model.output_dim", apply_on="instantiate")
        parser.link_arguments("model.context_window", "data.init_args.context_window",
                              apply_on="parse")

    def _parse_ckpt_path(self) -> None:
        """Check a checkpoint's hyperparameters against the configuration.

        (LightningCLI's own version lets the checkpoint's values silently replace the command
        line's, so a run would score settings other than those it was asked for and record.)
        """
        self.checkpoint_hparams = None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        saved = dict(checkpoint.get("hyper_parameters", {}))
        saved.pop("_instantiator", None)
        model = self.config[subcommand]["model"]
        problems = checkpoint_mismatches(saved, model, subcommand,
                                         checkpoint.get("strategy_source"))
        if problems:
            raise ValueError(
                f"the checkpoint {ckpt_path} was made with other settings than this command "
                "asks for:\n  " + "\n  ".join(problems) + "\nPass the checkpoint's values "
                "(or a config that has them); compile may differ, eval_protocol and lr may "
                "differ for test, validate and predict, and a strategy file may have moved if "
                "its contents are unchanged.")
        self.checkpoint_hparams = saved

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        for logger in self.trainer.loggers:  # loggers sharing a folder: one free version_N,
            _ = logger.version                # resolved before any of them writes there
        for init_args, version in self.given_versions:
            init_args.version = version  # the folder chosen for this run is not its config
        refuse_a_missing_last_checkpoint(
            self.trainer, self.config[self.subcommand] if self.subcommand else self.config,
            self.run_folder_fixed)
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        saved = getattr(self, "checkpoint_hparams", None)
        if not saved:
            return
        linked = [f"model.{k}: checkpoint {saved[k]!r}, this data {self.model.hparams[k]!r}"
                  for k in sorted(LINKED_FROM_DATA)
                  if k in saved and saved[k] != self.model.hparams[k]]
        if linked:
            raise ValueError("the checkpoint was trained on data of another shape:\n  "
                             + "\n  ".join(linked) + "\nUse the datamodule it was trained with.")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.default_root_dir is not None and logger_save_dirs(config):
            raise ValueError(
                f"--trainer.default_root_dir {config.trainer.default_root_dir} would be ignored: "
                f"the logger writes the run under its save_dir {logger_save_dirs(config)[0]!r} "
                "(from the config). Choose where runs go with --trainer.logger.init_args.save_dir "
                "DIR instead")
        default_lr = inspect.signature(TitansForecaster).parameters["lr"].default
        if config.get("optimizer") is not None and config.model.lr != default_lr:
            raise ValueError(
                f"--model.lr {config.model.lr} would be ignored: --optimizer replaces the "
                "module's Adam; give the learning rate as --optimizer.lr instead")
        name_run_after_config(config)
        # The loggers are built with the run folder chosen below; the saved config.yaml (and
        # result.json) keep the version as given, so `titans fit --config RUN/config.yaml`
        # makes a new run instead of finding this one's folder taken.
        self.given_versions = [(logger.init_args, logger.init_args.get("version"))
                               for logger in run_folder_loggers(config)]
        share_run_folder(config)
        if self.subcommand is not None and config.get("ckpt_path"):
            continue_in_run_folder(config, config.ckpt_path)  # fit resumes; the others score
        self.run_folder_fixed = run_folder_fixed(config)
        name_new_run_folder(config)  # a folder that neither the user nor a checkpoint chose

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a run that fails before its first step leaves no run folder of its own."""
        folder = run_folder(self.trainer)
        existed = folder is not None and folder.exists()
        resuming = subcommand == "fit" and bool(self.config.fit.ckpt_path)
        try:
            with warnings.catch_warnings():
                if resuming:  # continuing in its own, non-empty folder is the point
                    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
                super()._run_subcommand(subcommand)
        except BaseException:
            if folder is not None and not existed and self.trainer.global_step == 0 \
                    and holds_only_setup_files(folder):
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def before_fit(self) -> None:
        self.fit_started = time.perf_counter()
        folder = run_folder(self.trainer)
        if not self.config.fit.ckpt_path and folder is not None and folder.is_dir() \
                and any(folder.iterdir()):
            raise ValueError(
                f"the run folder {folder} already holds a run; a new fit would overwrite its "
                "config.yaml, result.json and checkpoints. Leave the logger's version unset "
                "(each fit then gets a new numbered folder), choose another one, or resume that "
                f"run with --ckpt_path {folder / 'checkpoints' / 'last.ckpt'}")
        if self.trainer.progress_bar_callback is None:
            self.trainer.callbacks.append(EpochLine())

    def before_test(self) -> None:
        warn_without_checkpoint(self.config.test.ckpt_path, "test")

    def after_test(self) -> None:
        """Write the scores to ``test.json`` in the run folder (strict JSON, with a status)."""
        if not self.trainer.is_global_zero:
            return
        folder = record_folder(self.trainer)
        if folder is None:
            return
        scores = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                  if k.startswith("test/")}
        path = write_result(folder, {"ckpt_path": self.config.test.ckpt_path,
                                     "test_mse": scores.get("test/mse"),
                                     "test_mae": scores.get("test/mae"),
                                     "config": self.config_as_dict(),
                                     "commit": self.commit, "device": device_name(self.trainer)},
                            name=TEST_FILE)
        print(f"test MSE {scores.get('test/mse', float('nan')):.6f}\nscores: {path}")

    def before_validate(self) -> None:
        warn_without_checkpoint(self.config.validate.ckpt_path, "validate")

    def after_fit(self) -> None:
        """Test the best-validation checkpoint and write ``result.json``."""
        checkpoint = self.trainer.checkpoint_callback
        best_path = getattr(checkpoint, "best_model_path", "")
        fit_state = checkpoint.state_dict() if checkpoint is not None else None
        self.fit_updates = self.model.memory_update_counts()  # training and validation
        scores = self.trainer.test(self.model, datamodule=self.datamodule,
                                   ckpt_path="best" if best_path else None)[0]
        if checkpoint is not None:  # loading the best checkpoint rewound the callback to its state
            checkpoint.load_state_dict(fit_state)
        self.test_updates = difference(self.model.memory_update_counts(),  # a collective
                                       self.model.counts_before_test)
        if not self.trainer.is_global_zero:
            return
        folder = record_folder(self.trainer)
        if folder is None:  # fast_dev_run: nowhere to keep a record
            print(f"\ntest MSE {scores['test/mse']:.6f} (fast_dev_run, so no result.json)")
            return
        result = self.fit_result(scores, best_path)
        path = write_result(folder, result)
        log_run_hparams(self.trainer, result)
        tested = f"best epoch {result['best_epoch']}" if best_path else "final weights"
        if result["val_mse"] is not None:
            tested += f", val MSE {result['val_mse']:.6f}"
        fit = result["memory_updates"]["fit"]
        print(f"\ntest MSE {result['test_mse']:.6f}  ({tested}); memory updates in the fit: "
              f"{fit['updates']}, slots skipped: {fit['skipped_slots']}\nresult: {path}")
        if result["memory_scope"] == "shared" and 0 < fit["updates"] <= fit["skipped_slots"]:
            rank_zero_warn(
                "EVERY memory update of this fit was skipped (non-finite surprise, gradient, "
                "weights or state): the memory never learned, so this run measures a frozen "
                "memory. Check the strategy and its options.", category=RuntimeWarning)
        bad = [k for k in ("val_mse", "test_mse", "test_mae")
               if result[k] is not None and not math.isfinite(result[k])]
        if bad:
            raise FloatingPointError(
                f"{', '.join(bad)} not finite: the memory or the model diverged while scoring "
                f"({path} has status 'nonfinite'); see the memory statistics in TensorBoard")

    def fit_result(self, scores: dict[str, float], best_path: str) -> dict[str, Any]:
        checkpoint = self.trainer.checkpoint_callback
        monitors_val_mse = bool(best_path) and checkpoint.monitor == "val/mse"
        if monitors_val_mse and checkpoint.best_model_score is None:
            raise RuntimeError(
                f"the checkpoint callback has a best checkpoint ({best_path}) but no best "
                "val/mse: its state was not restored, so the tested epoch cannot be trusted")
        hparams = self.model.hparams
        return {
            "config": self.config_as_dict(),
            "commit": self.commit,
            "seed": self.config["fit"]["seed_everything"],
            # this attempt, plus the attempts before it up to the checkpoint it resumed from
            "wall_s": round(self.model.earlier_fit_wall_s
                            + time.perf_counter() - self.fit_started, 3),
            "best_epoch": checkpoint_epoch(best_path) if best_path else None,
            "val_mse": float(checkpoint.best_model_score) if monitors_val_mse else None,
            "test_mse": scores["test/mse"],
            "test_mae": scores["test/mae"],
            "strategy": hparams.strategy,
            "strategy_source": self.model.strategy_source,
            "memory_scope": hparams.memory_scope,
            # slot updates, all memory layers: the fit's (training and validation), and the
            # test's, made on the tested checkpoint's memory
            "memory_updates": {"fit": self.fit_updates, "test": self.test_updates},
            "curve": self.model.curve,
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
        warn_without_checkpoint(self.config.predict.ckpt_path, "predict")
        if not any(isinstance(c, PredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionWriter) and self.trainer.is_global_zero:
                print(f"predictions: {callback.path}")


# Settings that do not change the trained model or its memory, so a checkpoint may be scored with
# other values (not resumed: a fit continues exactly as it began).
MAY_DIFFER_WHEN_SCORING = {"eval_protocol", "lr"}
MAY_ALWAYS_DIFFER = {"compile"}  # how the same maths runs: also a resumed fit may change it
LINKED_FROM_DATA = {"input_dim", "output_dim"}


def checkpoint_mismatches(saved: dict[str, Any], model: Any, subcommand: str,
                          source: dict[str, str] | None) -> list[str]:
    """One line per model setting in which the configuration differs from the checkpoint."""
    problems = []
    for key, before in saved.items():
        if key in LINKED_FROM_DATA or key in MAY_ALWAYS_DIFFER or key not in model:
            continue
        if subcommand != "fit" and key in MAY_DIFFER_WHEN_SCORING:
            continue
        now = model[key]
        if key == "strategy_options":
            before, now = before or {}, now or {}
        if key == "strategy":
            why = same_strategy_file(before, now, source)
            if why is not None:
                problems.append(f"model.strategy: checkpoint {before!r}, this command {now!r}"
                                f"{why}")
        elif now != before:
            problems.append(f"model.{key}: checkpoint {before!r}, this command {now!r}")
    return problems


def same_strategy_file(before: str, now: str, source: dict[str, str] | None) -> str | None:
    """None when strategy ``now`` is the checkpoint's rule ``before`` (the same built-in, or a
    file or module with the same contents, wherever it is now); otherwise why not, as the end of
    a message. An edited file under the same path is another rule too."""
    current = strategy_source(now)
    if current is None:  # a built-in (or nothing loadable): only the same name is the same rule
        return None if now == before else ""
    if source is None:  # a checkpoint without the rule's source: compare with the old file
        old = strategy_source(before) if Path(before).is_file() else None
        if old is None:
            return (" (the checkpoint does not keep the rule's source, and the old file is "
                    "gone, so it cannot be checked that they are the same rule)")
        source = old
    if current["sha256"] == source["sha256"]:
        return None
    return (" (a file with other contents than the checkpoint's rule, edited or another one; "
            "the checkpoint keeps that rule's source under 'strategy_source')")


def logger_save_dirs(config: Any) -> list[str]:
    """The ``save_dir`` of every logger of a parsed subcommand config that has one."""
    loggers = config.trainer.logger
    return [logger.init_args.save_dir for logger in (loggers if isinstance(loggers, list)
                                                     else [loggers])
            if getattr(logger, "init_args", None) is not None
            and getattr(logger.init_args, "save_dir", None) is not None]


FOLDER_LOGGERS = (TensorBoardLogger, CSVLogger)  # those writing into save_dir/name/version


def name_run_after_config(config: Any) -> None:
    """Give the TensorBoard and CSV loggers of a parsed config whose ``name`` is null (the base
    config's) the file name of the first ``--config``: ``--config configs/sinwave.yaml --config
    mine.yaml`` runs in ``logs/sinwave/`` (the benchmark's config comes first, what changes it
    after). A name from a config or the command line is kept; without a config file, runs go
    straight into ``save_dir``."""
    files = [f for f in config.get("config") or [] if f is not None]
    if not files:
        return
    for logger in run_folder_loggers(config):
        if logger.init_args.get("name") is None:
            logger.init_args.name = Path(str(files[0])).stem


def share_run_folder(config: Any) -> None:
    """Give every TensorBoard and CSV logger of a parsed config the ``save_dir``, ``name`` and
    ``version`` of the last one, so that they write one run folder.

    ``--trainer.logger.init_args.save_dir DIR`` (and ``name``, ``version``) sets these for the
    last logger of a list only; the others follow it.
    """
    sharing = run_folder_loggers(config)
    for logger in sharing[:-1]:
        for key in ("save_dir", "name", "version"):
            logger.init_args[key] = sharing[-1].init_args.get(key)


def run_folder_loggers(config: Any) -> list[Any]:
    """The TensorBoard and CSV loggers of a parsed config (one, or those of a list)."""
    loggers = config.trainer.logger
    return [logger for logger in (loggers if isinstance(loggers, list) else [loggers])
            if writes_run_folder(logger)]


def writes_run_folder(logger: Any) -> bool:
    class_path = getattr(logger, "class_path", None)
    if not isinstance(class_path, str) or getattr(logger, "init_args", None) is None:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, FOLDER_LOGGERS)


def continue_in_run_folder(config: Any, ckpt_path: str) -> None:
    """Point the TensorBoard and CSV loggers of a parsed config at the run folder of
    ``ckpt_path`` (other loggers, W&B's or MLflow's, keep their own names and versions).

    Checkpoints live in ``RUN/checkpoints/``; a resumed fit logs to ``RUN`` again (same
    ``save_dir``, ``name`` and ``version``), so its checkpoint callback finds its own folder and
    keeps its best score; test, validate and predict write their output there too. Lightning's
    special paths (``last``, ``best``, ...) and remote URLs are left alone.
    """
    path = Path(ckpt_path)
    if "://" in ckpt_path or path.suffix != ".ckpt":
        return
    if path.parent.name != "checkpoints":
        rank_zero_warn(
            f"--ckpt_path {ckpt_path} is not in a run folder's checkpoints/ (where `titans fit` "
            "saves it), so this run logs to a new run folder (a resumed fit's best checkpoint "
            "so far stays where it is)")
        return
    run = path.parent.parent
    for logger in run_folder_loggers(config):  # another logger's name and version mean else
        logger.init_args.save_dir = str(run.parent.parent)
        logger.init_args.name = run.parent.name
        logger.init_args.version = run.name


def name_new_run_folder(config: Any) -> None:
    """Give the TensorBoard and CSV loggers of a parsed config that have no ``version`` the
    name of a new run folder, ``version_3-titans_default-shared-reference-seed0`` (see
    :mod:`titans_lightning.run_names`), so that TensorBoard's run list tells runs apart.

    Runs on a remote ``save_dir`` keep Lightning's own ``version_N``.
    """
    unset = [logger for logger in run_folder_loggers(config)
             if logger.init_args.get("version") is None]
    if not unset:
        return
    save_dir, name = unset[-1].init_args.get("save_dir"), unset[-1].init_args.get("name")
    if save_dir is None or "://" in str(save_dir):
        return
    seed = config.get("seed_everything")
    model = config.model
    version = new_run_version(Path(save_dir) / (name or ""), model.strategy, model.memory_scope,
                              model.mac_order, None if isinstance(seed, bool) else seed)
    for logger in unset:  # one folder: share_run_folder gave them the same save_dir and name
        logger.init_args.version = version


class EpochLine(Callback):
    """One line per epoch, for runs without a progress bar (logs, batch jobs, ``titans-bench``).

    ``epoch 3/19  train/loss 0.021300  val/mse 0.021000  best 0.020100  98 s/epoch  ETA 27 min``

    The best validation MSE is the checkpoint callback's (so it survives a resume), including
    this epoch's. The training loss is the mean over the epoch's batches, summed on the device
    and read once per epoch.
    """

    def __init__(self):
        self.started = time.perf_counter()
        self.first_epoch: int | None = None
        self.loss_sum: Tensor | float = 0.0
        self.batches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch
            self.started = time.perf_counter()
        self.loss_sum, self.batches = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.loss_sum = self.loss_sum + loss.detach()
            self.batches += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.first_epoch is None:
            return
        print(self.line(trainer), flush=True)

    def line(self, trainer: L.Trainer) -> str:
        epoch = trainer.current_epoch
        last = trainer.max_epochs - 1 if (trainer.max_epochs or 0) > 0 else None
        parts = [f"epoch {epoch}/{'?' if last is None else last}"]
        if self.batches:
            parts.append(f"train/loss {float(self.loss_sum) / self.batches:.6f}")
        val = trainer.callback_metrics.get("val/mse")
        if val is not None:
            parts.append(f"val/mse {float(val):.6f}")
        checkpoint = trainer.checkpoint_callback
        scores = [float(v) for v in (getattr(checkpoint, "best_model_score", None), val)
                  if v is not None and getattr(checkpoint, "monitor", None) == "val/mse"]
        if scores:
            parts.append(f"best {min(scores):.6f}")
        per_epoch = (time.perf_counter() - self.started) / (epoch - self.first_epoch + 1)
        parts.append(f"{per_epoch:.0f} s/epoch")
        if last is not None and last >= epoch:
            parts.append(f"ETA {per_epoch * (last - epoch) / 60:.0f} min")
        return "  ".join(parts)


HPARAM_METRICS = {"hp/val_mse": "val_mse", "hp/test_mse": "test_mse",
                  "hp/epoch_tested": "best_epoch"}


def run_hparams(result: dict[str, Any]) -> dict[str, Any]:
    """The settings that tell runs apart, as the HParams tab shows them (scalars and strings)."""
    config = result["config"]
    model, data = config["model"], config["data"]
    return {
        "benchmark": str(data.get("class_path", "")).rsplit(".", 1)[-1],
        "strategy": model["strategy"],
        "strategy_options": json.dumps(model.get("strategy_options") or {}, sort_keys=True),
        "memory_scope": model["memory_scope"], "mac_order": model["mac_order"],
        "eval_protocol": model["eval_protocol"], "seed": result["seed"],
        "max_epochs": config["trainer"]["max_epochs"], "lr": model["lr"],
        "context_window": model["context_window"], "dim_feedforward": model["dim_feedforward"],
        "batch_size": data.get("init_args", {}).get("batch_size"),
    }


def log_run_hparams(trainer: L.Trainer, result: dict[str, Any]) -> None:
    """The run's settings with its scores (best val/mse, test/mse, best epoch), once the test
    has run: TensorBoard's HParams tab then compares runs by what they scored."""
    metrics = {tag: float(result[key]) for tag, key in HPARAM_METRICS.items()
               if result[key] is not None}
    params = run_hparams(result)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # its hparams.yaml, written first, is kept
            logger.log_hyperparams(params, metrics)
        else:  # hparams.yaml stays the module's and datamodule's hyperparameters
            logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def run_folder(trainer: L.Trainer) -> Path | None:
    """The folder a run's logger writes to, or None without a logger (fast_dev_run)."""
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(log_dir) if log_dir else None


def record_folder(trainer: L.Trainer) -> Path | None:
    """Where a run's records (``result.json``, ``test.json``) go: a TensorBoard or CSV logger's
    run folder; for another logger (W&B, MLflow), whose ``save_dir`` every run shares, the
    folder Lightning keeps that run's checkpoints under (``save_dir/name/version``); without a
    logger, ``default_root_dir``; None for fast_dev_run's stand-in logger."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    if isinstance(logger, DummyLogger):
        return None
    if isinstance(logger, FOLDER_LOGGERS):
        return Path(logger.log_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


SETUP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents")


def holds_only_setup_files(folder: Path) -> bool:
    """Whether ``folder`` holds only what a run writes before its first step."""
    return all(p.is_dir() and not any(p.iterdir()) or p.name.startswith(SETUP_FILES)
               for p in folder.iterdir())


def run_folder_fixed(config: Any) -> bool:
    """Whether the folder that Lightning takes checkpoints from, the first logger's (or
    ``default_root_dir``'s without a logger), is fixed by the config (a version given, or set
    by ``--ckpt_path``), rather than picked by the logger when it starts (``logger: true``, a
    TensorBoard or CSV logger without a version, W&B's or MLflow's new run)."""
    loggers = config.trainer.logger
    if loggers in (False, None, []):
        return True
    first = loggers[0] if isinstance(loggers, list) else loggers
    return writes_run_folder(first) and first.init_args.get("version") is not None


def refuse_a_missing_last_checkpoint(trainer: L.Trainer, config: Any, folder_fixed: bool
                                     ) -> None:
    """``--ckpt_path last`` that finds no last checkpoint in a checkpoint folder the logger has
    just picked (see :func:`run_folder_fixed`): Lightning would warn, then fit from the start or
    score the untrained model, and exit 0, so refuse. Where the folder is fixed (a version, no
    logger, a checkpoint ``dirpath``), ``last`` is the set-and-forget resume of a job that is
    requeued, and an empty folder is its first attempt: Lightning's warning stands."""
    if config.get("ckpt_path") != "last":
        return
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    if folder_fixed or (callbacks and all(c.dirpath is not None for c in callbacks)):
        return
    if any(c._find_last_checkpoints(trainer) for c in callbacks):  # Lightning's own lookup
        return
    folder = run_folder(trainer) or Path(trainer.default_root_dir)
    raise ValueError(
        f"--ckpt_path last finds no last checkpoint: it looks in the folder the logger picked "
        f"for this run ({folder}), a new one, so Lightning would go on from untrained weights. "
        "Give the checkpoint file of the run, --ckpt_path RUN/checkpoints/last.ckpt (its folder "
        "is then reused), or fix the folder (--trainer.logger.init_args.version NAME) to resume "
        "whatever it holds")


def warn_without_checkpoint(ckpt_path: str | None, subcommand: str) -> None:
    if not ckpt_path:
        rank_zero_warn(f"`titans {subcommand}` without --ckpt_path scores an untrained model "
                       "(its random initial weights); pass the checkpoint of a fit, e.g. "
                       "--ckpt_path logs/sinwave/version_0-titans_default-shared-reference-seed0/"
                       "checkpoints/last.ckpt")


def checkpoint_epoch(path: str) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def main(args: ArgsType = None) -> None:
    try:
        TitansCLI(args)
    except (ValueError, FloatingPointError) as error:  # bad settings or data, a diverged run
        # the cause first, not at the end of a long traceback through LightningCLI
        print(f"titans: error: {error}\n(traceback below)", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    except SIGTERMException:  # Lightning stops at the next step, as a SystemExit with code 0
        print("titans: stopped by SIGTERM before the run finished, so it has no result; resume "
              "a fit with --ckpt_path RUN/checkpoints/last.ckpt", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()

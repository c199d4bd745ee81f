"""TitansForecaster: the LightningModule around :class:`~titans_lightning.model.MACTitan`.

Thin on purpose: the model maths lives in ``model.py`` and ``memory.py``. This module scores
forecasts, logs them, and keeps a run exactly resumable.

Shape legend
    B  sequences in the batch     T  time steps per sequence     O  output channels (1)
    n  scored positions per sequence (t >= C-1 with t+1 < T)

The prediction made at step t forecasts the target at t+1. Positions t < C-1 have no full
context window and carry neither loss nor metric. The neural memory keeps learning in every
stage (training, validation, test, predict): that is the point of test-time memory, so the
Trainer must run with ``inference_mode=False`` (the ``titans`` CLI's default).

Several processes (DDP, see :mod:`titans_lightning.distributed`): the shared memory combines its
update across ranks while training, so all ranks keep one memory; validation, test and predict
run the whole split on every rank (no distributed sampler) with no combination, so every rank
computes the same memory and the same metrics, which are therefore not synchronised.
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, SequentialSampler
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from .distributed import (broadcast_memory, check_ranks_agree, keep_buffers_local, reduce_hook,
                          warn_if_split_is_divided)
from .encoder import EncoderLayer
from .model import MACTitan
from .sampling import RankMajorSampler
from .strategy import strategy_source

EVAL_PROTOCOLS = ("default", "reference")
COMPILE_TARGETS = ("none", "encoder")  # what --model.compile runs through torch.compile
# the outer model may run in half precision; the memory learns in float32 in every one of these
SUPPORTED_PRECISION = ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "bf16-true")
# float16 weights break Adam: its eps (1e-8) and small squared gradients underflow to 0 there
FLOAT16_WEIGHTS_ERROR = (
    "--trainer.precision 16-true is not supported: with float16 weights, Adam's eps (1e-8) and "
    "small squared gradients underflow to 0, so its steps become NaN or inf; use bf16-true "
    "(float32's range), or 16-mixed / bf16-mixed (float32 weights)")
REFERENCE_FIRST_SCORED = 15  # the reference's evaluation slice, hard-coded for C = 16

INFERENCE_MODE_ERROR = (
    "the neural memory learns during validation, test and predict and needs autograd, which "
    "inference mode disables; run the Trainer with inference_mode=False (the `titans` CLI's "
    "default: drop --trainer.inference_mode true)"
)


def scored_pairs(preds: Tensor, targets: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """Predictions made at t and the targets at t+1 they forecast, for first <= t < T-1.

    ``first`` = C-1 is the first step with a full context window (the model's ``valid`` mask is
    ``t >= C-1``): slicing rather than masking keeps the step free of host synchronisation.
    ``preds`` (B, T, O), ``targets`` (B, T, O) -> two (B, n, O) tensors, in at least float32
    (under ``--trainer.precision bf16-true`` the model's outputs are bfloat16: scores are not).
    """
    dtype = torch.promote_types(preds.dtype, torch.float32)
    return preds[:, first:-1].to(dtype), targets[:, first + 1:].to(dtype)


def forecast_loss(preds: Tensor, targets: Tensor, first: int) -> Tensor:
    """MSE between the prediction at t and the target at t+1, over scored positions only."""
    return F.mse_loss(*scored_pairs(preds, targets, first))


class TitansForecaster(L.LightningModule):
    """Next-step forecasting with a MAC Titans model whose neural memory learns at test time.

    Args:
        strategy: memory strategy: a built-in name, a dotted module or a ``path/to/file.py``.
        strategy_options: hyperparameters the strategy reads (e.g. ``{"theta": 0.01}``).
        memory_scope: ``shared`` (one memory for the whole batch) or ``per_sequence``.
        input_dim: channels read per step (linked from the datamodule by the CLI).
        output_dim: channels predicted per step (linked from the datamodule by the CLI).
        context_window: C, steps in one window (the CLI passes it on to the datamodule).
        hidden_dim: embedding width d.
        pm_len: persistent-memory tokens P per MAC layer.
        num_layers: MAC layers.
        memory_layers: layers of the memory MLP (1 or 2).
        memory_hidden: hidden width of the two-layer memory MLP.
        nhead: attention heads.
        dim_feedforward: feed-forward width of the attention layer.
        dropout: dropout of the attention layer.
        lr: Adam learning rate for the outer parameters (never the fast weights).
        eval_protocol: ``default`` evaluates in eval mode over targets t+1 for t >= C-1;
            ``reference`` reproduces the published reference's quirks for fidelity checks only:
            dropout stays on during validation and test, and scoring starts at t = 15 whatever
            C is (positions without a prediction count as predicted 0). Its shuffled
            validation/test order is the datamodule's ``shuffle_eval``.
        mac_order: ``reference`` (the published MAC block: the gate reads the memory after it
            stored the window group) or ``causal`` (gate first, then store).
        compile: ``none`` (eager) or ``encoder``: every encoder layer runs through
            ``torch.compile`` (see :func:`compile_encoders`); the same model either way.
    """

    def __init__(self, strategy: str = "titans_default", strategy_options: dict | None = None,
                 memory_scope: str = "shared", input_dim: int = 1, output_dim: int = 1,
                 context_window: int = 16, hidden_dim: int = 16, pm_len: int = 4,
                 num_layers: int = 2, memory_layers: int = 2, memory_hidden: int = 32,
                 nhead: int = 2, dim_feedforward: int = 2048, dropout: float = 0.1,
                 lr: float = 1e-3, eval_protocol: str = "default", mac_order: str = "reference",
                 compile: str = "none"):
        super().__init__()
        if eval_protocol not in EVAL_PROTOCOLS:
            raise ValueError(
                f"eval_protocol must be one of {EVAL_PROTOCOLS}, got {eval_protocol!r}")
        if compile not in COMPILE_TARGETS:
            raise ValueError(f"compile must be one of {COMPILE_TARGETS}, got {compile!r}")
        self.save_hyperparameters(ignore=["_instantiator"])  # the CLI's, not a setting
        # the rule's file as it was when the model was built (None for a built-in)
        self.strategy_source = strategy_source(strategy)
        self.model = MACTitan(
            input_dim=input_dim, output_dim=output_dim, context_window=context_window,
            hidden_dim=hidden_dim, pm_len=pm_len, num_layers=num_layers,
            memory_layers=memory_layers, memory_hidden=memory_hidden, strategy=strategy,
            strategy_options=strategy_options, memory_scope=memory_scope, nhead=nhead,
            dim_feedforward=dim_feedforward, dropout=dropout, mac_order=mac_order)
        compile_encoders(self.model, compile)
        self.metrics = nn.ModuleDict({
            # every rank scores the whole split itself: summing over ranks would count it twice
            split: MetricCollection({"mse": MeanSquaredError(sync_on_compute=False),
                                     "mae": MeanAbsoluteError(sync_on_compute=False)},
                                    prefix=f"{split}/")
            for split in ("val", "test")})
        # Per memory layer, {stat: (U, S)} for the updates of the latest batch; read by callbacks
        # in their on_*_batch_end hooks (which Lightning calls before the module's own).
        self.memory_stats: list[dict[str, Tensor]] = []
        self._memory_before_sanity_check: dict[str, Tensor] | None = None
        # wall time of the fit attempts before this one, up to the checkpoint it resumed from
        self.earlier_fit_wall_s = 0.0
        # One entry per validation of the fit, also across resumes (it is in every checkpoint):
        # {"epoch", "train_loss", "val_mse"}; see record_curve
        self.curve: list[dict[str, int | float | None]] = []
        self._train_loss_sum: tuple[Tensor, int] | None = None  # this epoch's (sum, batch sizes)
        self._first_nonfinite_step: Tensor | None = None  # see note_nonfinite
        self._attempt_started = time.perf_counter()
        # (global step, epoch) of the checkpoint being scored, outside a fit; see epoch_step
        self.scored_checkpoint: tuple[int, int] | None = None

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(inputs)

    # -- steps ----------------------------------------------------------------------------------
    def run_model(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Run the model (its memory learns as it goes) and keep the memory's statistics."""
        preds, valid = self.model(batch["inputs"])  # (B, T, O), (T,)
        self.collect_memory_stats()
        return preds, valid

    def shared_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Run the model; return the scored (preds, targets), (B, n, O) each."""
        preds, _ = self.run_model(batch)  # valid: t >= C-1
        return scored_pairs(preds, batch["targets"], self.hparams.context_window - 1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        preds, _ = self.run_model(batch)
        loss = forecast_loss(preds, batch["targets"], self.hparams.context_window - 1)
        self.note_nonfinite(loss)
        self.add_to_epoch_loss(loss, preds.shape[0])
        # one tag, train/loss: the epoch's mean of the global batches' losses (on_step as well
        # would split it into train/loss_step and train/loss_epoch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=preds.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluate("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluate("test", batch)

    def evaluate(self, split: str, batch: dict[str, Tensor]) -> None:
        if self.hparams.eval_protocol == "reference":
            preds, _ = self.run_model(batch)  # (B, T, O), 0 where no window exists
            preds, targets = scored_pairs(preds, batch["targets"], REFERENCE_FIRST_SCORED)
        else:
            preds, targets = self.shared_step(batch)
        preds, targets = preds.contiguous(), targets.contiguous()
        metrics = self.metrics[split]
        metrics.update(preds, targets)
        self.log_dict(metrics, on_epoch=True, prog_bar=split == "val", batch_size=preds.shape[0])

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Raw outputs: ``preds[:, t]`` forecasts ``targets[:, t+1]``; ``valid`` (T,) marks t."""
        preds, valid = self.run_model(batch)
        return {"index": batch["index"], "preds": preds, "targets": batch["targets"],
                "valid": valid}

    def note_nonfinite(self, loss: Tensor) -> None:
        """Remember, on the device, the first step whose loss was not finite (read per epoch)."""
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        first = self._first_nonfinite_step
        if first is None or first.device != loss.device:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first_nonfinite_step = torch.where(bad & (first < 0), step, first)

    def stop_if_diverged(self) -> None:
        """Stop a fit whose training loss went NaN or inf (one host sync, once per epoch),
        before the epoch's checkpoint: NaN weights would be saved as both best and last."""
        first = self._first_nonfinite_step
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=self.device)
        if self.trainer.world_size > 1:  # every rank stops, or none: a lone stop would hang
            first = self.trainer.strategy.reduce(first.clone(), reduce_op="max")
        if int(first) < 0:
            return
        options = self.hparams.strategy_options or {}
        raise FloatingPointError(
            f"the training loss became NaN or infinite at step {int(first)} (epoch "
            f"{self.current_epoch}), so the outer model diverged; the run stops before saving "
            "this epoch's checkpoint. The usual cause is a memory whose updates are too large "
            f"(strategy {self.hparams.strategy!r}, options {options}): try a smaller step size "
            "(e.g. a lower theta in --model.strategy_options) or a lower --model.lr.")

    def collect_memory_stats(self) -> None:
        self.memory_stats = [memory.pop_history() for memory in self.model.memories]

    def memory_update_counts(self) -> dict[str, int]:
        """See :meth:`local_update_counts`; under DDP with per-sequence memory the skipped slots
        of every rank (a collective: every rank must call it)."""
        counts = self.local_update_counts()
        if self.trainer.world_size > 1 and self.hparams.memory_scope == "per_sequence":
            skipped = torch.tensor(counts["skipped_slots"], device=self.device)
            counts["skipped_slots"] = int(self.trainer.strategy.reduce(skipped, reduce_op="sum"))
        return counts

    def local_update_counts(self) -> dict[str, int]:
        """Updates made by all memory layers since the memory began, and the slots of them that
        were skipped (one per sequence in per-sequence scope; one host sync). The counters are
        buffers, so they continue across checkpoints."""
        return {"updates": sum(int(m.num_updates) for m in self.model.memories),
                "skipped_slots": sum(int(m.skipped_updates) for m in self.model.memories)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Fast weights, K and V are buffers, so self.parameters() never includes them.
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # -- stages ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        loops = (self.trainer.validate_loop, self.trainer.test_loop, self.trainer.predict_loop)
        if any(loop.inference_mode for loop in loops):
            raise RuntimeError(INFERENCE_MODE_ERROR)
        if self.trainer.world_size > 1 and self.trainer.overfit_batches:
            raise ValueError(
                "--trainer.overfit_batches replaces the rank sampler, so every rank would train "
                "on the same sequences; it works on one process only (drop it, or use "
                "--trainer.limit_train_batches)")
        precision = str(self.trainer.precision)
        if precision == "16-true":
            raise ValueError(FLOAT16_WEIGHTS_ERROR)
        if precision not in SUPPORTED_PRECISION:
            raise ValueError(
                f"--trainer.precision {precision} is not supported: use one of "
                f"{', '.join(SUPPORTED_PRECISION)} (the neural memory learns in float32 in all "
                "of them)")
        if self.trainer.world_size > 1:
            keep_buffers_local(self.trainer.strategy)  # before Lightning wraps the model in DDP
        compile_encoders(self.model, self.hparams.compile)  # again after a spawn (pickled)

    def on_fit_start(self) -> None:
        self._attempt_started = time.perf_counter()
        self.scored_checkpoint = None  # a fit logs at its own steps
        broadcast_memory(self.model)

    def on_train_epoch_start(self) -> None:
        self.forget_epoch_step()
        self._train_loss_sum = None
        if self.trainer.world_size > 1:
            check_ranks_agree(self.trainer.num_training_batches,
                              first_sequence_length(self.trainer.train_dataloader),
                              self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.combine_memory_updates(self.trainer.world_size > 1
                                    and self.hparams.memory_scope == "shared")

    def combine_memory_updates(self, across_ranks: bool) -> None:
        """Install (or remove) the hook that makes every rank apply the global batch's update."""
        for memory in self.model.memories:
            memory.reduce = reduce_hook(memory) if across_ranks else None

    def start_evaluation(self, loaders: Any, stage: str) -> None:
        """Every rank evaluates the whole split alone, from rank 0's memory."""
        self.combine_memory_updates(False)
        if self.trainer.world_size > 1:
            warn_if_split_is_divided(loaders, stage)
            broadcast_memory(self.model)

    def on_validation_model_eval(self) -> None:
        self.set_evaluation_mode()

    def on_test_model_eval(self) -> None:
        self.set_evaluation_mode()

    def set_evaluation_mode(self) -> None:
        # The reference never switched to eval mode, so its dropout stayed on while scoring.
        self.trainer.model.train(self.hparams.eval_protocol == "reference")

    def on_train_epoch_end(self) -> None:
        self.log_epoch_step()
        self.stop_if_diverged()  # when no validation ran this epoch
        for memory in self.model.memories:  # once per epoch: reading the count is a host sync
            memory.warn_if_skipped()

    # -- the step axis of epoch-level scalars ---------------------------------------------------
    # Lightning logs an epoch's training and validation metrics at its last batch's index, and a
    # test at the global step. The `step` logged here sets one convention for every epoch-level
    # scalar, the callbacks' included (they draw their figures at epoch_step too).
    def epoch_step(self) -> int:
        """The optimizer steps of the weights an epoch's scalars measure: (epoch + 1) x batches
        for an epoch's training and validation alike; for a test (or validate) of a loaded
        checkpoint, that checkpoint's step (after a fit: the tested best epoch's)."""
        if self.trainer.state.fn != TrainerFn.FITTING and self.scored_checkpoint is not None:
            return self.scored_checkpoint[0]
        return self.global_step

    def log_epoch_step(self) -> None:
        """Log ``step`` (which Lightning's loggers take as the step) and the matching ``epoch``."""
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        epoch = self.current_epoch if fitting or self.scored_checkpoint is None \
            else self.scored_checkpoint[1]
        self.log_dict({"step": float(self.epoch_step()), "epoch": float(epoch)},
                      on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def forget_epoch_step(self) -> None:
        """Drop the logged ``step`` and ``epoch`` from the callback metrics once their epoch is
        over: ModelCheckpoint names its files by them where they are, and stale ones would name
        (and overwrite) every checkpoint saved within the next epoch."""
        for key in ("step", "epoch"):
            self.trainer.callback_metrics.pop(key, None)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_step()
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self.record_curve()

    # -- the learning curve of the fit ----------------------------------------------------------
    def add_to_epoch_loss(self, loss: Tensor, batch_size: int) -> None:
        """Add a training batch's loss to this epoch's sum, on the device (no host sync)."""
        weighted = loss.detach().float() * batch_size
        total, count = self._train_loss_sum or (None, 0)
        total = weighted if total is None or total.device != weighted.device else total + weighted
        self._train_loss_sum = (total, count + batch_size)

    def record_curve(self) -> None:
        """Append this validation's entry to ``curve``: the epoch, the mean training loss of
        the epoch's batches up to this validation in this attempt (weighted by batch size over
        every rank, as ``train/loss``; None where none trained), and the validation MSE (the
        score the checkpoints monitor). A value that is not finite is None, with a warning.
        Called before the checkpoints of this validation are saved, so each holds its own
        epoch's entry. Reading the two numbers is a host sync, once per validation."""
        train_loss = None
        if self._train_loss_sum is not None:
            total, count = self._train_loss_sum
            both = torch.stack([total, torch.full_like(total, count)])
            both = self.trainer.strategy.reduce(both, reduce_op="sum")
            train_loss = float(both[0] / both[1])
        val_mse = float(self.metrics["val"].compute()["val/mse"])
        entry = {"epoch": self.current_epoch, "train_loss": train_loss, "val_mse": val_mse}
        bad = [k for k in ("train_loss", "val_mse")
               if entry[k] is not None and not math.isfinite(entry[k])]
        if bad:
            rank_zero_warn(
                f"epoch {self.current_epoch}: {' and '.join(bad)} not finite (the record's "
                "curve has null there); this epoch cannot be the best one, but the memory or "
                "the model diverged while it ran", category=RuntimeWarning)
        self.curve.append({k: None if k in bad else v for k, v in entry.items()})

    def on_test_epoch_end(self) -> None:
        self.log_epoch_step()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.stop_if_diverged()
        self.start_evaluation(self.trainer.val_dataloaders, "validation")
        # Lightning's sanity check is not part of the protocol: it must leave the memory as it was.
        if self.trainer.sanity_checking:
            self._memory_before_sanity_check = {
                name: buffer.clone() for name, buffer in self.model.named_buffers()}

    def on_validation_end(self) -> None:
        if self._memory_before_sanity_check is not None:
            restore_buffers(self.model, self._memory_before_sanity_check)
            self._memory_before_sanity_check = None
        broadcast_memory(self.model)  # the ranks agree already, unless a kernel is nondeterministic
        self.forget_epoch_step()  # after the callbacks' on_validation_end: checkpoints are saved

    def on_test_start(self) -> None:
        self.counts_before_test = self.memory_update_counts()
        self.start_evaluation(self.trainer.test_dataloaders, "test")

    def on_predict_start(self) -> None:
        self.start_evaluation(self.trainer.predict_dataloaders, "predict")

    # -- checkpoints ----------------------------------------------------------------------------
    # The memory (fast weights, strategy state) is made of buffers, so it is in every state_dict.
    # The random generators are saved too, so that a resumed fit continues exactly.
    # The fit's wall time so far is saved too, so that a resumed run's record counts every attempt,
    # and so is its learning curve, so that the record's curve has every epoch.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = capture_rng_states()
        every_rank = rng_states_of_every_rank(self.trainer.world_size)
        if every_rank is not None:  # each rank's dropout stream is its own
            checkpoint["rng_states_per_rank"] = every_rank
        checkpoint["strategy_source"] = self.strategy_source
        checkpoint["fit_wall_s"] = self.earlier_fit_wall_s + time.perf_counter() \
            - self._attempt_started
        checkpoint["curve"] = [dict(entry) for entry in self.curve]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.scored_checkpoint = (int(checkpoint.get("global_step", 0)),
                                  int(checkpoint.get("epoch", 0)))
        resuming_fit = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        if not resuming_fit:
            return
        states = own_rng_states(checkpoint, self._trainer.global_rank, self._trainer.world_size)
        if states is not None:
            restore_rng_states(states)
        self.earlier_fit_wall_s = float(checkpoint.get("fit_wall_s", 0.0))
        if "curve" not in checkpoint and int(checkpoint.get("global_step", 0)) > 0:
            rank_zero_warn(
                "this checkpoint holds no learning curve (an older version of the package made "
                "it): the record's curve starts at the epochs this fit runs from here",
                category=UserWarning)
        self.curve = [dict(entry) for entry in checkpoint.get("curve", [])]
        follow_checkpoint_folders(self._trainer, checkpoint)


def compile_encoders(model: nn.Module, target: str = "encoder") -> None:
    """Run every encoder layer of ``model`` (the package's or ``nn.TransformerEncoderLayer``)
    through ``torch.compile`` with its default backend (inductor) when ``target`` is
    ``"encoder"``; ``"none"`` leaves the model eager.

    ``nn.Module.compile`` compiles in place, so the state dict keeps its keys (wrapping a layer
    as ``torch.compile(layer)`` would prefix them with ``_orig_mod.``). Pickling drops it
    (``nn.Module.__getstate__``), so the module calls this again in ``setup``; a layer compiled
    already is left alone, since compiling it again would recompile it. Nothing is compiled
    before the first call.

    Why the encoder layer and not the window-group step: the layer is a pure function of its
    input and parameters, and where it runs on PyTorch's operators off the CPU it traces to one
    graph, dropout included. The step around it holds the memory harness, which
    ``torch._dynamo.explain(MACTitan.forward_group)`` (torch 2.13, CPU, titans_default) cuts
    into 29 graphs: the harness asks ``torch.is_inference_mode_enabled()``, makes a
    ``requires_grad_`` leaf, calls ``torch.autograd.grad`` and compares the tensors' ``_version``
    counters (data-dependent); and dynamo fails on the strategy's ``compute_surprise`` with an
    internal guard error, which stops the run unless errors are suppressed. On the CPU the layer
    itself breaks at every kernel call (8 graphs per call: the kernels are ctypes calls on
    ``data_ptr()`` integers, and the dispatch's library lookup reaches ``shutil.which``); with
    the kernels off, at the chunked feed-forward (``tolist()`` of its chunk bounds) and at the
    dropout draws (a seed read with ``item()``, NumPy). So it is there for the GPU.
    """
    if target == "none":
        return
    for layer in model.modules():
        if isinstance(layer, (EncoderLayer, nn.TransformerEncoderLayer)) \
                and layer._compiled_call_impl is None:
            layer.compile()


def first_sequence_length(loader: Any) -> int | None:
    """Steps of this rank's first training sequence of the epoch, where it can be read without
    drawing from the global random generator (a sampler of fixed order: the rank sampler, a
    distributed or a sequential one); None otherwise (not checked)."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, (RankMajorSampler, DistributedSampler, SequentialSampler)):
        return None
    try:
        return int(loader.dataset[next(iter(sampler))]["inputs"].shape[0])
    except (TypeError, KeyError, IndexError, AttributeError, StopIteration):
        return None


def follow_checkpoint_folders(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """Let each ModelCheckpoint of a resumed fit keep its best score, wherever the run folder is.

    Lightning restores ``best_model_score`` (and the top-k bookkeeping) only when the saved
    ``dirpath`` is the same string as the callback's current one; otherwise the first validation
    after the resume becomes "best" and the wrong epoch is tested. The ``titans`` CLI resumes in
    the checkpoint's own folder, so the paths differ only in spelling (relative, absolute) or
    because the folder was moved. The saved state is pointed at the current folder: its files
    are used there where they exist, and kept where they were otherwise.
    """
    states = checkpoint.get("callbacks", {})
    for callback in trainer.checkpoint_callbacks:
        state = states.get(callback.state_key)
        if not state or callback.dirpath is None or state.get("dirpath") == callback.dirpath:
            continue

        def here(path: str, new_dir: str = str(callback.dirpath)) -> str:
            moved = os.path.join(new_dir, os.path.basename(path)) if path else path
            return moved if path and os.path.isfile(moved) else path

        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = here(state[key])
        if "best_k_models" in state:
            state["best_k_models"] = {here(p): v for p, v in state["best_k_models"].items()}
        state["dirpath"] = callback.dirpath


def restore_buffers(module: nn.Module, buffers: dict[str, Tensor]) -> None:
    """Put back buffers saved by name (assignment, so a buffer may have changed shape since)."""
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, value)
    for memory in getattr(module, "memories", []):
        memory.history.clear()


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), NumPy and Python generator states, as weights-only-loadable types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # one process per GPU under DDP: its own device's generator (reading every device's
        # would make each process create a context on all of them)
        "cuda": (([torch.cuda.get_rng_state()] if torch.distributed.is_initialized()
                  else torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []),
        "cuda_device": torch.cuda.current_device() if torch.distributed.is_initialized()
        and torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def rng_states_of_every_rank(world_size: int) -> list[dict[str, Any]] | None:
    """Every rank's generator states, in rank order (a collective); None on one process."""
    if world_size < 2 or not torch.distributed.is_initialized():
        return None
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, capture_rng_states())
    return states


def own_rng_states(checkpoint: dict[str, Any], rank: int, world_size: int
                   ) -> dict[str, Any] | None:
    """The generator states this rank saved, or rank 0's where the checkpoint has no per-rank
    states of this many ranks (then the ranks' streams differ from the interrupted run's)."""
    per_rank = checkpoint.get("rng_states_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        return per_rank[rank]
    if per_rank is not None or (world_size > 1 and "rng_states" in checkpoint):
        rank_zero_warn(f"the checkpoint holds the random generators of "
                       f"{len(per_rank) if per_rank else 1} process(es), not {world_size}: "
                       "the resumed fit draws other dropout masks than the interrupted one")
    return checkpoint.get("rng_states")


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        if states.get("cuda_device") is not None:  # one process's own device
            torch.cuda.set_rng_state(states["cuda"][0], device=torch.cuda.current_device())
        else:
            torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))

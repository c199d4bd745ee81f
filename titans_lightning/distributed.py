"""Several processes, one memory: what keeps the neural memories of all ranks identical.

Shape legend
    S  memory slots (1 for the shared memory)      n  fast weights per slot (n_weights)
    W  processes (ranks)                            B  sequences per rank and batch

Under data-parallel training every rank runs the model on its own share of the global batch.
The shared memory changes *inside* the forward pass, so each rank would otherwise update its
copy from different rows and the copies would drift apart. Three things prevent it:

* :func:`all_reduce_mean`, installed as ``NeuralMemory.reduce`` while training, turns each
  rank's surprise and surprise gradient into those of the whole global batch (one
  ``all_reduce`` per memory update) before the strategy's ``apply_update``: every rank then
  applies the identical update and keeps identical strategy state, as one process would have
  on the global batch.
* :func:`broadcast_memory` copies every memory buffer from rank 0 (at the start of each stage
  and after validation), so the ranks also *start* from the same memory.
* :class:`~titans_lightning.sampling.RankMajorSampler` cuts each shuffled global batch of
  W * B sequences into W consecutive parts, one per rank, so a run on W ranks sees the batches a
  single process with batch size W * B would see (same permutation, same seed).

A strategy that needs other cross-rank statistics defines
``reduce_across_ranks(memory, surprise, grads, rows) -> (surprise, grads)`` next to its four
contract functions; :func:`reduce_hook` installs it instead of :func:`all_reduce_mean`, which it
may call itself and then combine whatever else it needs.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .memory import NeuralMemory
from .sampling import world_size

ReduceHook = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


# -- one update, all ranks -------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward is again a sum over ranks, so a differentiable strategy
    (``DIFFERENTIABLE = True``) still gets exact outer gradients through the combined update."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad)


def all_reduce_mean(surprise: Tensor, grads: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """The ``NeuralMemory.reduce`` hook: the row-weighted mean of every rank's (surprise, grads).

    ``surprise`` (S,) and ``grads`` (S, n) come from ``rows`` rows per slot on this rank. One
    ``all_reduce`` of the packed ``[surprise * rows, grads * rows, rows]`` returns, on every rank,
    the figures of all rows together. Exact for a surprise that is a mean over rows (every
    built-in but one): the result is what one process would compute on the global batch.
    ``contrastive_ema``'s InfoNCE compares each row with the other rows of its own chunk, so it
    is not a mean of per-row terms: there the result is the row-weighted average of the per-rank
    losses and their gradients, not the loss of the global batch (each rank's negatives are its
    own rows only).
    """
    S = surprise.shape[0]
    weight = float(rows)
    packed = torch.cat([surprise.reshape(-1) * weight, grads.reshape(-1) * weight,
                        grads.new_full((1,), weight)])  # (S + S*n + 1,)
    total = _AllReduceSum.apply(packed)
    total = total[:-1] / total[-1]  # divide by the rows of all ranks
    return total[:S].view_as(surprise), total[S:].view_as(grads)


def reduce_hook(memory: NeuralMemory) -> ReduceHook:
    """The hook to install on ``memory``: its strategy's ``reduce_across_ranks`` if it has one."""
    custom = getattr(memory.strategy, "reduce_across_ranks", None)
    return functools.partial(custom, memory) if custom is not None else all_reduce_mean


# -- identical starting points ---------------------------------------------------------------------
def memories_of(module: nn.Module) -> list[NeuralMemory]:
    return [m for m in module.modules() if isinstance(m, NeuralMemory)]


@torch.no_grad()
def broadcast_memory(module: nn.Module, src: int = 0) -> None:
    """Copy every memory buffer of ``module`` (fast weights, strategy state, counters) from rank
    ``src`` to all ranks. Buffers are replaced, not written in place, so a rank whose per-sequence
    memory holds a different number of slots takes rank ``src``'s shape too.

    Costs one small object broadcast (the shapes) and one tensor broadcast per dtype.
    """
    if world_size() == 1:
        return
    buffers = [(owner, name, buffer) for memory in memories_of(module)
               for owner in memory.modules() for name, buffer in owner._buffers.items()
               if buffer is not None]
    shapes = [[tuple(buffer.shape) for _, _, buffer in buffers]]
    dist.broadcast_object_list(shapes, src=src)
    received = [buffer.detach() if tuple(buffer.shape) == shape else buffer.new_empty(shape)
                for (_, _, buffer), shape in zip(buffers, shapes[0])]
    for dtype in sorted({t.dtype for t in received}, key=str):
        group = [i for i, t in enumerate(received) if t.dtype == dtype]
        flat = torch.cat([received[i].reshape(-1) for i in group])  # a fresh copy
        dist.broadcast(flat, src=src)
        for i, part in zip(group, flat.split([received[i].numel() for i in group])):
            received[i] = part.view(received[i].shape).clone()
    for (owner, name, _), value in zip(buffers, received):
        setattr(owner, name, value)


def keep_buffers_local(strategy: Any) -> None:
    """Stop DDP from broadcasting rank 0's buffers at every forward: the reduce hook keeps the
    shared memory identical at a fraction of the cost, and per-sequence slots belong to each
    rank's own sequences. Called from ``LightningModule.setup``, which Lightning runs before it
    wraps the model."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if kwargs is None:
        warnings.warn(
            f"{type(strategy).__name__} is not a DDP strategy: the neural memory is kept "
            "identical across ranks only under DDP (--trainer.strategy ddp)", RuntimeWarning,
            stacklevel=2)
        return
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs.pop("broadcast_buffers", None)  # deprecated since torch 2.13; ignored beside it
        kwargs["forward_sync_buffers"] = False  # buffers are still broadcast once, at wrapping
    else:
        kwargs["broadcast_buffers"] = False


def check_ranks_agree(batches: int, seq_len: int | None, epoch: int) -> None:
    """Fail, naming the difference, when the ranks would run different numbers of training
    batches or sequence lengths: each batch makes two all-reduces per window group inside the
    forward, so such ranks would wait on each other until the backend's timeout (30 minutes for
    NCCL). One all-gather per epoch."""
    if world_size() < 2:
        return
    mine = {"batches": batches, "seq_len": seq_len}
    every: list[Any] = [None] * world_size()
    dist.all_gather_object(every, mine)
    differing = [key for key in mine if len({rank[key] for rank in every}) > 1]
    if differing:
        seen = "; ".join(f"{key}: " + ", ".join(f"rank {r} {rank[key]}"
                                               for r, rank in enumerate(every))
                         for key in differing)
        raise RuntimeError(
            f"the ranks disagree at the start of training epoch {epoch} ({seen}); the shared "
            "memory combines every update across ranks, so they must run the same number of "
            "batches of the same length. Use a sampler that gives every rank the same number "
            "of batches (datamodules.base uses RankMajorSampler) and sequences of one length.")


def warn_if_split_is_divided(loaders: Any, stage: str) -> None:
    """Warn when a distributed sampler hands each rank only part of an evaluation split: each
    rank's memory then sees other sequences and the logged metrics are rank 0's part only."""
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    for loader in loaders:
        samplers = (getattr(loader, "sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None))
        divided = [s for s in samplers if isinstance(s, DistributedSampler) and s.num_replicas > 1]
        if divided and divided[0].rank == 0:  # one warning per run, not per rank
            warnings.warn(
                f"the {stage} split is divided among the ranks by a DistributedSampler: every "
                "rank's memory sees different sequences and the metrics cover rank 0's share "
                "only. Run with use_distributed_sampler=False (the titans CLI's default) so that "
                "every rank evaluates the whole split.", RuntimeWarning, stacklevel=2)
            return

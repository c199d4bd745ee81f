"""The update harness: one memory update, around the four strategy functions.

Shape legend
    S  memory slots      R  rows (tokens) per slot      d  width      n  weights per slot

:func:`update_memory` asks the strategy for keys and values, takes the gradient of its surprise
with respect to the fast weights (functionally: the strategy's surprise reads a leaf passed to it
through :meth:`NeuralMemory.at`, the memory's own weights are never swapped), lets it compute
new weights and state, and commits them only where everything is finite, per slot. A strategy
that breaks the contract (wrong shapes, missing weights, in-place edits of the weights, state
or gradients) stops the run with a :class:`~titans_lightning.contract.StrategyError`.

No host synchronisation, except for a ``DIFFERENTIABLE`` rule while training: it reads whether
any slot was skipped, to redo such an update (:func:`_redo_without_skipped`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import kernels
from .contract import CONTRACT, StrategyError, probing
from .memory_network import recall_error_and_gradient
from .strategies import titans_default

if TYPE_CHECKING:
    from .memory import NeuralMemory

# titans_default's four functions as shipped: a replaced one sends the rule down the general path
_TITANS_DEFAULT_FUNCTIONS = {name: getattr(titans_default, name) for name in CONTRACT}


def update_memory(memory: NeuralMemory, x: Tensor) -> Tensor:
    """One update from the chunk ``x`` (S, R, d), in the memory's dtype; returns the surprise."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "the neural memory learns at test time and needs autograd, which inference mode "
            "disables; run the Trainer with inference_mode=False (the `titans` CLI does)"
        )
    old = memory.fast_weights
    if _takes_the_default_rules_own_path(memory, old):
        surprise, grads, ok, kept = _titans_default_update(memory, x, old)
    else:
        old_state = dict(memory.strategy_state._buffers)
        surprise, grads, new = _compute(memory, x, old, old_state)
        check = surprise.detach() + _state_flag(memory, old_state)  # NaN where the state is not
        ok, kept = kernels.commit_update(check, grads, new, old, memory.num_updates,
                                         memory.skipped_updates)
        if memory.differentiable and torch.is_grad_enabled() and not bool(ok.all()):
            ok, kept = _redo_without_skipped(memory, x, old, old_state, ok)
        _commit_state(memory, old_state, ok)
    memory.fast_weights = kept
    memory.update_log.record(surprise, grads, old, kept, ok, memory._gate)
    return surprise


def _takes_the_default_rules_own_path(memory: NeuralMemory, old: Tensor) -> bool:
    """Whether the memory runs the built-in ``titans_default`` as shipped (not a copy, not with
    a function replaced), without a reduction across processes, and with its momentum as the
    rule makes it (else the general path, whose checks name what is wrong)."""
    if memory.strategy is not titans_default or memory.reduce is not None:
        return False
    if any(getattr(titans_default, name) is not function
           for name, function in _TITANS_DEFAULT_FUNCTIONS.items()):
        return False
    momentum = memory.strategy_state._buffers.get("momentum")
    return momentum is not None and momentum.shape == old.shape and momentum.dtype == old.dtype


def _titans_default_update(memory: NeuralMemory, x: Tensor, old: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The built-in ``titans_default``'s update without the contract's round trips: its keys and
    values, the surprise with its gradient in one call, and its step with the commit in one more
    (:func:`kernels.momentum_step`, one pass on the CPU kernel). The same numbers as its four
    functions through the general path (tested). On one CPU thread, against the general path
    with the one-call surprise, it takes 6 % off an evaluation batch at context 16 and 1-2 %
    off the others (``benchmarks/own_path.py``). Returns (surprise, grads, ok, kept weights)
    and keeps the momentum where ok."""
    keys, values = titans_default.compute_keys_values(memory, x)
    surprise, grads = recall_error_and_gradient(keys, values, old, memory.layout)
    alpha, eta, theta = (memory.options.get(k, v) for k, v in titans_default.DEFAULTS.items())
    momentum = memory.strategy_state._buffers["momentum"]
    ok, kept, momentum = kernels.momentum_step(surprise, grads, old, momentum, alpha,
                                               eta, theta, memory.num_updates,
                                               memory.skipped_updates)
    memory.strategy_state.momentum = momentum
    memory._gate = None
    return surprise, grads, ok, kept


def _compute(memory: NeuralMemory, x: Tensor, old: Tensor, old_state: dict[str, Tensor]
             ) -> tuple[Tensor, Tensor, Tensor]:
    """The strategy's (surprise, grads, new flat weights) for ``x``; it assigns its state."""
    versions = [t._version for t in (old, *old_state.values())]  # in-place edits bump them
    surprise, grads = _surprise_and_grads(memory, x, old)
    if memory.reduce is not None:
        surprise, grads = memory.reduce(surprise, grads, x.shape[1])
    memory._gate = None  # only apply_update reports the gate
    new = _apply_update(memory, grads, surprise)
    if versions != [t._version for t in (old, *old_state.values())]:
        raise broke(memory, "the update", "changed the fast weights or the strategy state in "
                    "place; assign new tensors instead (memory.state[name] = new, and return the "
                    "new weights from apply_update)")
    return surprise, grads, new


def _redo_without_skipped(memory: NeuralMemory, x: Tensor, old: Tensor,
                          old_state: dict[str, Tensor], ok: Tensor) -> tuple[Tensor, Tensor]:
    """A differentiable update with skipped slots, done again with their rows zeroed.

    Keeping a skipped slot's old weights discards its branch of the graph, but the backward pass
    still runs through it: with a zero gradient times an infinite local derivative it would carry
    NaN into the outer gradients of the parameters every slot shares (K, V, step sizes, the
    start). The redone branch is finite, so the kept slots' gradients are exact. Costs one host
    synchronisation per update, only for differentiable rules while training.
    """
    for name, value in old_state.items():
        setattr(memory.strategy_state, name, value)
    x = torch.where(_expand(ok, x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    surprise, grads, new = _compute(memory, x, old, old_state)
    check = surprise.detach() + _state_flag(memory, old_state)
    redone_ok = ok & kernels.all_finite(check.reshape(memory.n_slots, -1), grads, new)
    memory.skipped_updates.add_((ok & ~redone_ok).sum())  # slots the first pass kept
    return redone_ok, torch.where(redone_ok[:, None], new, old)


def _surprise_and_grads(memory: NeuralMemory, x: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    """The strategy's surprise (S,) at the weights ``old`` and its gradient with respect to them
    (S, n); with its graph for a differentiable rule while training.

    A rule whose ``compute_surprise`` is titans_default's gets both from one functional call
    (on the CPU kernel, one pass) when no graph is kept. It is the same function, rounded
    differently from autograd's: a differentiable rule of that surprise (``titans_gated``,
    ``meta_nlms``) takes this path in evaluation and autograd's in training."""
    keep_graph = memory.differentiable and torch.is_grad_enabled()
    if not keep_graph and memory.strategy.compute_surprise is titans_default.compute_surprise:
        return _recall_error_and_gradient(memory, x, old)
    with torch.enable_grad():
        keys, values = _keys_values(memory, x)
        leaf = old if keep_graph and old.requires_grad else old.detach().requires_grad_(True)
        surprise = call(memory, "compute_surprise", keys, values, at=leaf)
        if not isinstance(surprise, Tensor) or surprise.shape != (memory.n_slots,):
            got = tuple(surprise.shape) if isinstance(surprise, Tensor) else \
                type(surprise).__name__
            raise broke(memory, "compute_surprise", f"returned {got}, expected one loss per "
                        f"slot, shape ({memory.n_slots},)")
        if not surprise.requires_grad:
            raise broke(memory, "compute_surprise", "returned a surprise that does not depend on "
                        "the fast weights; compute it through memory.retrieve(keys) or "
                        "memory.recall_error(keys, values)")
        (grads,) = torch.autograd.grad(surprise.sum(), [leaf], allow_unused=True,
                                       create_graph=keep_graph)
    grads = torch.zeros_like(old) if grads is None else grads
    return (surprise, grads) if keep_graph else (surprise.detach(), grads)


def _recall_error_and_gradient(memory: NeuralMemory, x: Tensor, old: Tensor
                               ) -> tuple[Tensor, Tensor]:
    """The surprise and its gradient for a rule whose surprise is the reference's recall error
    (titans_default's ``compute_surprise``, which most built-in rules share), when no graph is
    kept: one functional call on the weights, where the CPU kernel computes both in one pass."""
    with torch.enable_grad():
        keys, values = _keys_values(memory, x)
    return recall_error_and_gradient(keys, values, old, memory.layout)


def _keys_values(memory: NeuralMemory, x: Tensor) -> tuple[Tensor, Tensor]:
    pair = call(memory, "compute_keys_values", x)
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(t, Tensor) for t in pair)):
        raise broke(memory, "compute_keys_values", "did not return a (keys, values) pair of "
                    "tensors")
    keys, values = pair
    S, R = x.shape[:2]
    if keys.dim() != 3 or values.dim() != 3 or keys.shape[:2] != (S, R) \
            or values.shape[:2] != (S, R):
        raise broke(memory, "compute_keys_values", f"returned keys {tuple(keys.shape)} and "
                    f"values {tuple(values.shape)} for a chunk {tuple(x.shape)}; both must be "
                    f"({S}, {R}, width)")
    return keys, values


def _apply_update(memory: NeuralMemory, grads: Tensor, surprise: Tensor) -> Tensor:
    """The strategy's new weights, flat (S, n), after checking what it returned."""
    version = grads._version
    new = call(memory, "apply_update", memory.unflatten(grads), surprise)
    names, shapes = memory.weight_names, memory.layout.shapes
    if grads._version != version:
        raise broke(memory, "apply_update", "changed `grads` in place; read them, and compute "
                    "new tensors from them")
    if not isinstance(new, Mapping):
        raise broke(memory, "apply_update", f"returned a {type(new).__name__}, not the dict of "
                    f"new weights {list(names)}")
    missing = [n for n in names if n not in new]
    if missing:
        raise broke(memory, "apply_update", f"returned no weight(s) {missing}; it must return "
                    f"every weight of {list(names)}")
    for name, shape in zip(names, shapes):
        got = tuple(getattr(new[name], "shape", ()))
        if got != (memory.n_slots, *shape):
            raise broke(memory, "apply_update", f"returned {name!r} of shape {got}, expected "
                        f"{(memory.n_slots, *shape)} (slots first)")
    return memory.flatten(new)


def _state_flag(memory: NeuralMemory, old_state: dict[str, Tensor]) -> Tensor | float:
    """Per slot (S,), 0 where the strategy's new state is finite and NaN where it is not; state
    that is not per slot flags every slot. Only replaced tensors are checked."""
    flag: Tensor | float = 0.0
    S = memory.n_slots
    for name, before in old_state.items():
        after = memory.strategy_state._buffers[name]
        if after is before or not after.is_floating_point():
            continue
        if name in memory.per_slot_state:
            if after.dim() == 0 or after.shape[0] != S:
                raise broke(memory, "apply_update", f"set the per-slot state {name!r} to shape "
                            f"{tuple(after.shape)}: its first dimension must be the {S} slot(s)")
            flag = flag + after.detach().reshape(S, -1).mul(0).sum(1)
        else:
            flag = flag + after.detach().mul(0).sum()
    return flag


def _commit_state(memory: NeuralMemory, old_state: dict[str, Tensor], ok: Tensor) -> None:
    for name, old in old_state.items():
        new = memory.strategy_state._buffers[name]
        if new is not old:
            keep = _expand(ok, new) if name in memory.per_slot_state else ok.all()
            setattr(memory.strategy_state, name, torch.where(keep, new, old))


def call(memory: NeuralMemory, name: str, *args: Any, at: Tensor | None = None) -> Any:
    """A strategy function, with its errors named after the strategy and the function; ``at``
    gives it the memory seen with those weights (see :meth:`NeuralMemory.at`)."""
    try:
        return getattr(memory.strategy, name)(memory if at is None else memory.at(at), *args)
    except StrategyError:
        raise
    except Exception as error:
        if probing():  # the probe names the function and the call itself
            raise
        raise broke(memory, name, f"raised {type(error).__name__}: {error}") from error


def broke(memory: NeuralMemory, where: str, how: str) -> StrategyError:
    return StrategyError(f"memory strategy {memory.strategy_spec!r} broke the contract in "
                         f"{where}: it {how}")


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    """(S,) mask -> broadcastable against ``like`` (S, ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))

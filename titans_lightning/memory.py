"""The neural memory: a small MLP whose weights keep learning while the model runs.

Shape legend
    S  memory slots (1 = one memory shared by the whole batch; B = one per sequence)
    R  rows (tokens) per slot in one update or retrieval
    d  embedding width (emb_dim), h  hidden width of the two-layer memory

The fast weights are plain tensors with a leading slot dimension, owned by this module as
buffers: the outer optimiser never sees them, ``state_dict`` saves them, ``reset()`` restores
them. *How* they learn is delegated to a memory strategy (see :mod:`titans_lightning.strategy`);
this module is the harness around the four strategy functions: it takes the gradient of the
surprise, applies the strategy's new weights only where everything is finite, and records
per-update statistics as device tensors (no host synchronisation per update; the one exception:
a ``DIFFERENTIABLE`` rule while training reads whether any slot was skipped, to redo such an
update, see :meth:`NeuralMemory._redo_without_skipped`).

Scopes: the *shared* memory has one slot that persists across chunks, batches and epochs.
*Per-sequence* memory calls :meth:`NeuralMemory.start_sequences` at the start of every batch:
each sequence gets its own slot, started from ``initial_weights`` and the initial strategy state,
so the only thing that persists between batches is that starting point (learned by the outer
optimiser when the strategy makes it learnable).

A strategy that sets ``DIFFERENTIABLE = True`` keeps the autograd graph through its updates
while the outer model trains (``create_graph``), so the outer optimiser can learn its learnable
state (step sizes, projections, the starting weights) through the memory's test-time learning.
"""
from __future__ import annotations

import contextlib
import warnings
from types import ModuleType
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import kernels
from .strategy import USER_MODULE_PREFIX, StrategyError, load_strategy, probing

STAT_NAMES = ("surprise", "grad_norm", "update_norm", "weight_norm", "gate_rate", "skipped")
HALF_TYPES = (torch.float16, torch.bfloat16)


def lowered_precision(device_type: str) -> bool:
    """Whether autocast or a half default dtype is in force (what :func:`full_precision` undoes)."""
    return torch.is_autocast_enabled(device_type) or torch.get_default_dtype() in HALF_TYPES


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Where the memory learns: autocast off and float32 as the default dtype, whatever the
    trainer's precision. In bfloat16, ``0.999 * w == w`` for every weight, so retention would
    never apply, and autocast would run the surprise's gradient in half precision.

    ``*-mixed`` precision enables autocast around the forward, ``*-true`` sets the default dtype
    to half there (tensors a strategy creates would be half). Callers on the chunk loop ask
    :func:`lowered_precision` first, so in float32 they enter no context at all.
    """
    autocast = torch.is_autocast_enabled(device_type)
    default = torch.get_default_dtype()
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        torch.set_default_dtype(torch.float32 if default in HALF_TYPES else default)
        try:
            yield
        finally:
            torch.set_default_dtype(default)


class StrategyState(Mapping[str, Tensor]):
    """Dict-like view of a strategy's state; assignment replaces the tensor (never in place)."""

    def __init__(self, holder: nn.Module):
        self._holder = holder

    def __getitem__(self, name: str) -> Tensor:
        holder = self._holder  # its dicts directly: nn.Module.__getattr__ costs more
        value = holder._buffers.get(name)
        if value is None:
            value = holder._parameters.get(name)
        if value is None:
            from .strategy import did_you_mean  # only on this error path
            raise KeyError(f"no strategy state named {name!r}{did_you_mean(name, self)}; create "
                           f"it in init_memory_state with memory.register_state({name!r}, tensor)")
        return value

    def __setitem__(self, name: str, value: Tensor) -> None:
        if name not in self:
            from .strategy import did_you_mean  # only on this error path
            raise KeyError(f"strategy state {name!r}{did_you_mean(name, self)} was not registered "
                           "in init_memory_state")
        if isinstance(getattr(self._holder, name), nn.Parameter):
            raise KeyError(f"strategy state {name!r} is learnable; the outer optimiser owns it")
        if not isinstance(value, Tensor):
            raise TypeError(f"strategy state {name!r} must be a tensor, got {type(value).__name__}")
        self._holder._buffers[name] = value  # what setattr does for a buffer, without its checks

    def __contains__(self, name: object) -> bool:
        return name in self._holder._buffers or name in self._holder._parameters

    def __iter__(self) -> Iterator[str]:
        yield from self._holder._buffers
        yield from self._holder._parameters

    def __len__(self) -> int:
        return len(self._holder._buffers) + len(self._holder._parameters)


class NeuralMemory(nn.Module):
    """Fast-weight MLP ``d -> h -> d`` (or one ``d -> d`` layer) driven by a memory strategy.

    Args:
        dim: embedding width d of keys, values and queries.
        hidden: hidden width of the two-layer memory.
        num_layers: 1 (a single Linear) or 2 (Linear, SiLU, Linear).
        strategy: built-in name, dotted module, ``path/to/file.py``, or a module object.
        options: hyperparameters the strategy reads from ``memory.options``.
    """

    def __init__(self, dim: int = 16, hidden: int = 32, num_layers: int = 2,
                 strategy: Any = "titans_default", options: dict[str, Any] | None = None):
        super().__init__()
        if num_layers not in (1, 2):
            raise ValueError(f"num_layers must be 1 or 2, got {num_layers}")
        self.dim, self.hidden, self.num_layers = dim, hidden, num_layers
        self.strategy = load_strategy(strategy, options=options)
        self._strategy_spec = _portable_spec(strategy, self.strategy)
        self.differentiable = bool(getattr(self.strategy, "DIFFERENTIABLE", False))
        self.reduce = None  # optional hook combining (surprise, grads) across processes
        self.options: dict[str, Any] = dict(options or {})
        self.strategy_state = nn.Module()
        self._per_slot: set[str] = set()
        initial = self._initial_weights()
        self.weight_names = tuple(initial)
        self._shapes = [tuple(w.shape[1:]) for w in initial.values()]
        self._sizes = [w[0].numel() for w in initial.values()]
        flat = torch.cat([w.flatten(1) for w in initial.values()], dim=1)  # (1, n_weights)
        self.register_buffer("fast_weights", flat.clone())
        self.register_buffer("initial_weights", flat.clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))
        self._warned_skips = 0
        self._now = _UpdateScratch()  # what the update in progress has been told
        self.history: list[dict[str, Tensor]] = []
        self._building = True  # state and learnable weights may be created only now
        self.strategy.init_memory_state(self, dim)
        self._building = False
        self.initial_state = nn.Module()  # what reset() restores; saved, so it survives loading
        for name, value in self.strategy_state._buffers.items():
            self.initial_state.register_buffer(name, value.detach().clone())

    # -- fast weights -------------------------------------------------------------------------
    def _initial_weights(self) -> dict[str, Tensor]:
        dims = [self.dim, self.dim] if self.num_layers == 1 else [self.dim, self.hidden, self.dim]
        names = ["w", "b"] if self.num_layers == 1 else ["w1", "b1", "w2", "b2"]
        tensors = []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            layer = nn.Linear(fan_in, fan_out)  # the reference's default (Kaiming-uniform) init
            tensors += [layer.weight.detach().unsqueeze(0), layer.bias.detach().unsqueeze(0)]
        return dict(zip(names, tensors))

    @property
    def weights(self) -> dict[str, Tensor]:
        """The current fast weights, ``{name: (S, ...)}`` (views of ``fast_weights``)."""
        return self.unflatten(self.fast_weights)

    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        self.fast_weights = self.flatten(weights)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(S, n_weights) -> ``{name: (S, ...)}`` views, in ``weight_names`` order."""
        return _FlatViews(flat, self.weight_names, self._shapes, self._sizes)

    def flatten(self, weights: Mapping[str, Tensor]) -> Tensor:
        """``{name: (S, ...)}`` -> one (S, n_weights) tensor (a rule can then work on it whole)."""
        if isinstance(weights, _FlatViews) and weights.unchanged():
            return weights.flat  # the views of one unflatten: no copy
        return torch.cat([weights[n].reshape(weights[n].shape[0], -1)
                          for n in self.weight_names], dim=1)  # (S, n_weights)

    @property
    def n_slots(self) -> int:
        return self.fast_weights.shape[0]

    def learn_initial_weights(self) -> None:
        """Let the outer optimiser train the starting weights (per-sequence scope)."""
        self._refuse_after_construction("memory.learn_initial_weights()")
        self.initial_weights = nn.Parameter(self.initial_weights.detach().clone())

    def _refuse_after_construction(self, what: str) -> None:
        # A parameter made after the optimiser was built is trained by neither Adam nor DDP,
        # and state made later is missing from the checkpoints of the memory's start.
        if not self.__dict__.get("_building", True):
            raise StrategyError(
                f"memory strategy {self._strategy_spec!r} called {what} outside "
                "init_memory_state: create every parameter and state there, when the memory is "
                "built (the outer optimiser and the checkpoints only know what exists then)")

    def start_sequences(self, n: int) -> None:
        """Per-sequence scope: one slot per sequence, each from the initial weights and state."""
        self.fast_weights = self.initial_weights.expand(n, -1).clone()  # (n, n_weights)
        for name in self._per_slot:
            start = getattr(self.initial_state, name)
            setattr(self.strategy_state, name, start.expand(n, *start.shape[1:]).clone())

    def detach_(self) -> None:
        """Cut the autograd history of the weights and state (between outer steps)."""
        self.fast_weights = self.fast_weights.detach()
        for name, value in self.strategy_state._buffers.items():
            setattr(self.strategy_state, name, value.detach())

    def retrieve(self, q: Tensor) -> Tensor:
        """``M(q)`` with the current fast weights: (S, R, d) -> (S, R, d), in the dtype of q
        (computed in the memory's own, at least float32; see :func:`full_precision`)."""
        if q.dtype == self.fast_weights.dtype and not lowered_precision(q.device.type):
            return self._retrieve(q)
        with full_precision(q.device.type):
            return self._retrieve(q.to(self.fast_weights.dtype)).to(q.dtype)

    def _retrieve(self, q: Tensor) -> Tensor:
        if self.num_layers == 1:
            w = self.weights
            return _linear(q, w["w"], w["b"])
        return kernels.memory_mlp(q, self.fast_weights)

    def recall_error(self, keys: Tensor, values: Tensor) -> Tensor:
        """How badly the memory recalls ``values`` (S, R, d) from ``keys``: per slot, the sum over
        features of the mean over rows of ``(M(keys) - values)^2`` (S,), differentiable with
        respect to the fast weights. The reference's surprise (Eq. 12); one autograd node where
        the CPU kernel applies, so a strategy that uses it updates faster than one that spells
        it out."""
        if self.num_layers == 2:
            surprise, gradient = kernels.recall_error(keys, values, self.fast_weights,
                                                      twice_differentiable=self.differentiable)
            if gradient is not None:  # came with the surprise: the update needs no backward pass
                self._now.recalled = (surprise, gradient)
            return surprise
        return (self.retrieve(keys) - values).pow(2).sum((1, 2)) / values.shape[1]  # (S,)

    # -- strategy state -----------------------------------------------------------------------
    @property
    def state(self) -> StrategyState:
        """The strategy's state tensors (read ``memory.state[name]``, assign to replace)."""
        return StrategyState(self.strategy_state)

    def register_state(self, name: str, value: Tensor, per_slot: bool = False,
                       learnable: bool = False) -> None:
        """Create strategy state. ``per_slot`` tensors have a leading slot dimension (like the
        weights) and are rolled back per slot; ``learnable`` ones are trained by the outer
        optimiser (and never assigned by the strategy)."""
        self._refuse_after_construction(f"memory.register_state({name!r}, ...)")
        if learnable:
            self.strategy_state.register_parameter(name, nn.Parameter(value))
        else:
            self.strategy_state.register_buffer(name, value)
        if per_slot:
            self._per_slot.add(name)

    def zeros_like_weights(self) -> dict[str, Tensor]:
        return {n: torch.zeros_like(w) for n, w in self.weights.items()}

    def report_gate(self, rate: Tensor | float) -> None:
        """Called by a gated ``apply_update``: fraction of the update applied, per slot or one."""
        self._now.gate = torch.as_tensor(rate, dtype=torch.float32, device=self.num_updates.device)

    # -- the update -----------------------------------------------------------------------------
    def update(self, x: Tensor) -> Tensor:
        """One memory update from a chunk of layer outputs ``x`` (S, R, d); returns the surprise.

        Slots whose surprise, gradient, new weights or new strategy state are not all finite keep
        their old weights and state (a non-finite state that is not per slot rolls back every
        slot). A strategy that breaks the contract (wrong shapes, missing weights, in-place edits
        of the weights, state or gradients) stops the run with a :class:`StrategyError`.

        The update runs in the memory's dtype (at least float32), whatever the trainer's
        precision; see :func:`full_precision`.
        """
        x = x.detach()
        if x.dtype == self.fast_weights.dtype and not lowered_precision(x.device.type):
            return self._update(x)
        with full_precision(x.device.type):
            return self._update(x.to(self.fast_weights.dtype))

    def _update(self, x: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "the neural memory learns at test time and needs autograd, which inference mode "
                "disables; run the Trainer with inference_mode=False (the `titans` CLI does)"
            )
        old, old_state = self.fast_weights, dict(self.strategy_state._buffers)
        surprise, grads, new = self._compute(x, old, old_state)
        check = _detached(surprise) + self._state_flag(old_state)  # NaN where the state is not
        ok, kept = self._checked(check, grads, new, old)
        if self.differentiable and torch.is_grad_enabled() and not bool(ok.all()):
            ok, kept = self._redo_without_skipped(x, old, old_state, ok)
        self._buffers["fast_weights"] = kept
        self._commit_state(old_state, ok)
        self._record(surprise, grads, old, ok)
        return surprise

    def _compute(self, x: Tensor, old: Tensor, old_state: dict[str, Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """The strategy's (surprise, grads, new flat weights) for ``x``; it assigns its state."""
        versions = [t._version for t in (old, *old_state.values())]  # in-place edits bump them
        surprise, grads = self._surprise_and_grads(x, old)
        if self.reduce is not None:
            surprise, grads = self.reduce(surprise, grads, x.shape[1])
        self._now.gate = None  # only apply_update reports the gate
        new = self._apply_update(grads, surprise)
        if versions != [t._version for t in (old, *old_state.values())]:
            raise self._broke("the update", "changed the fast weights or the strategy state in "
                              "place; assign new tensors instead (memory.state[name] = new, and "
                              "return the new weights from apply_update)")
        return surprise, grads, new

    def _redo_without_skipped(self, x: Tensor, old: Tensor, old_state: dict[str, Tensor],
                              ok: Tensor) -> tuple[Tensor, Tensor]:
        """A differentiable update with skipped slots, done again with their rows zeroed.

        Keeping a skipped slot's old weights discards its branch of the graph, but the backward
        pass still runs through it: with a zero gradient times an infinite local derivative it
        would carry NaN into the outer gradients of the parameters every slot shares (K, V, step
        sizes, the start). The redone branch is finite, so the kept slots' gradients are exact.
        Costs one host synchronisation per update, only for differentiable rules while training.
        """
        self.strategy_state._buffers.update(old_state)
        x = torch.where(_expand(ok, x), x, torch.zeros((), dtype=x.dtype, device=x.device))
        surprise, grads, new = self._compute(x, old, old_state)
        check = _detached(surprise) + self._state_flag(old_state)
        redone_ok = ok & kernels.all_finite(check.reshape(self.n_slots, -1), grads, new)
        self.skipped_updates.add_((ok & ~redone_ok).sum())  # slots the first pass kept
        return redone_ok, torch.where(redone_ok[:, None], new, old)

    def _broke(self, where: str, how: str) -> StrategyError:
        return StrategyError(f"memory strategy {self._strategy_spec!r} broke the contract in "
                             f"{where}: it {how}")

    def _call(self, name: str, *args: Any) -> Any:
        """A strategy function, with its errors named after the strategy and the function."""
        try:
            return getattr(self.strategy, name)(self, *args)
        except StrategyError:
            raise
        except Exception as error:
            if probing():  # the probe names the function and the call itself
                raise
            raise self._broke(name, f"raised {type(error).__name__}: {error}") from error

    def _apply_update(self, grads: Tensor, surprise: Tensor) -> Tensor:
        """The strategy's new weights, flat (S, n_weights), after checking what it returned."""
        version = grads._version
        new = self._call("apply_update", self.unflatten(grads), surprise)
        if grads._version != version:
            raise self._broke("apply_update", "changed `grads` in place; read them, and compute "
                              "new tensors from them")
        if not isinstance(new, Mapping):
            raise self._broke("apply_update", f"returned a {type(new).__name__}, not the dict "
                              f"of new weights {list(self.weight_names)}")
        missing = [n for n in self.weight_names if n not in new]
        if missing:
            raise self._broke("apply_update", f"returned no weight(s) {missing}; it must return "
                              f"every weight of {list(self.weight_names)}")
        if not (isinstance(new, _FlatViews) and new.unchanged()):
            for name, shape in zip(self.weight_names, self._shapes):
                got = tuple(getattr(new[name], "shape", ()))
                if got != (self.n_slots, *shape):
                    raise self._broke("apply_update", f"returned {name!r} of shape {got}, "
                                      f"expected {(self.n_slots, *shape)} (slots first)")
        return self.flatten(new)

    def _state_flag(self, old_state: dict[str, Tensor]) -> Tensor | float:
        """Per slot (S,), 0 where the strategy's new state is finite and NaN where it is not;
        state that is not per slot flags every slot. Only replaced tensors are checked."""
        flag: Tensor | float = 0.0
        for name, before in old_state.items():
            after = self.strategy_state._buffers[name]
            if after is before or not after.is_floating_point():
                continue
            if name in self._per_slot:
                if after.dim() == 0 or after.shape[0] != self.n_slots:
                    raise self._broke("apply_update", f"set the per-slot state {name!r} to shape "
                                      f"{tuple(after.shape)}: its first dimension must be the "
                                      f"{self.n_slots} slot(s)")
                flag = flag + after.detach().reshape(self.n_slots, -1).mul(0).sum(1)
            else:
                flag = flag + after.detach().mul(0).sum()
        return flag

    def _checked(self, surprise: Tensor, grads: Tensor, new: Tensor, old: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """Per slot (S,), whether the update is finite, and the weights to keep (the new ones
        where it is, the old ones elsewhere); counts the update and its skipped slots."""
        return kernels.commit_update(surprise, grads, new, old, self.num_updates,
                                     self.skipped_updates)

    def _surprise_and_grads(self, x: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
        keep_graph = self.differentiable and torch.is_grad_enabled()
        with torch.enable_grad():
            keys, values = self._keys_values(x)
            leaf = old if keep_graph and old.requires_grad else old.detach().requires_grad_(True)
            self._buffers["fast_weights"] = leaf  # the strategy's surprise reads the leaf
            try:
                self._now.recalled = None
                surprise = self._call("compute_surprise", keys, values)
                if not isinstance(surprise, Tensor) or surprise.shape != (self.n_slots,):
                    got = tuple(surprise.shape) if isinstance(surprise, Tensor) else \
                        type(surprise).__name__
                    raise self._broke("compute_surprise", f"returned {got}, expected one loss per "
                                      f"slot, shape ({self.n_slots},)")
                recalled = self._now.recalled
                if recalled is not None and recalled[0] is surprise:
                    grads = recalled[1]  # recall_error computed it with the surprise
                elif not surprise.requires_grad:
                    raise self._broke("compute_surprise", "returned a surprise that does not "
                                      "depend on the fast weights; compute it through "
                                      "memory.retrieve(keys) or memory.recall_error(keys, values)")
                else:
                    (grads,) = torch.autograd.grad(surprise.sum(), [leaf], allow_unused=True,
                                                   create_graph=keep_graph)
            finally:
                self._buffers["fast_weights"] = old
                self._now.recalled = None
        grads = torch.zeros_like(old) if grads is None else grads
        return (surprise, grads) if keep_graph else (surprise.detach(), grads)

    def _keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pair = self._call("compute_keys_values", x)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(t, Tensor) for t in pair)):
            raise self._broke("compute_keys_values", "did not return a (keys, values) pair of "
                              "tensors")
        keys, values = pair
        S, R = x.shape[:2]
        if keys.dim() != 3 or values.dim() != 3 or keys.shape[:2] != (S, R) \
                or values.shape[:2] != (S, R):
            raise self._broke("compute_keys_values", f"returned keys {tuple(keys.shape)} and "
                              f"values {tuple(values.shape)} for a chunk {tuple(x.shape)}; both "
                              f"must be ({S}, {R}, width)")
        return keys, values

    def _commit_state(self, old_state: dict[str, Tensor], ok: Tensor) -> None:
        for name, old in old_state.items():
            new = self.strategy_state._buffers[name]
            if new is old:
                continue
            keep = _expand(ok, new) if name in self._per_slot else ok.all()
            self.strategy_state._buffers[name] = torch.where(keep, new, old)

    def _record(self, surprise: Tensor, grads: Tensor, old: Tensor, ok: Tensor) -> None:
        """Keep what the update's statistics need; they are computed, for all the updates of a
        forward at once, only when someone asks (:meth:`pop_history`)."""
        gate = None if self._now.gate is None else _detached(self._now.gate)  # None: all of it
        self.history.append({"surprise": _detached(surprise), "grads": _detached(grads),
                             "old": _detached(old), "new": _detached(self.fast_weights),
                             "ok": ok, "gate": gate})

    # -- bookkeeping -------------------------------------------------------------------------
    def pop_history(self) -> dict[str, Tensor]:
        """Statistics of the updates since the last call, ``{name: (U, S)}``, and clear them."""
        history, self.history = self.history, []
        if not history:
            return {}
        with torch.no_grad():
            surprise = torch.stack([h["surprise"] for h in history])  # (U, S)
            new = torch.stack([h["new"] for h in history])  # (U, S, n_weights)
            skipped = ~torch.stack([h["ok"] for h in history])  # (U, S)
            ones = surprise.new_ones(())  # ungated updates apply all of their step
            gate = torch.stack([(ones if h["gate"] is None else h["gate"].to(surprise.dtype))
                                .expand_as(h["surprise"]) for h in history])
            return {
                "surprise": surprise,
                "grad_norm": torch.stack([h["grads"] for h in history]).norm(dim=-1),
                "update_norm": (new - torch.stack([h["old"] for h in history])).norm(dim=-1),
                "weight_norm": new.norm(dim=-1),
                "gate_rate": gate.masked_fill(skipped, 0.0),
                "skipped": skipped.to(surprise.dtype),
            }

    def warn_if_skipped(self) -> int:
        """Warn once if updates were skipped since construction (one host sync); return count."""
        count = int(self.skipped_updates)
        if count > self._warned_skips and self._warned_skips == 0:
            warnings.warn(
                f"{count} memory update(s) produced a non-finite surprise, gradient or weight "
                "and were skipped: the memory kept its previous weights and state. Check the "
                "strategy's step sizes (see memory statistics for the skip count).",
                RuntimeWarning, stacklevel=2)
        self._warned_skips = max(self._warned_skips, count)
        return count

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the initial fast weights and strategy state (shared, one slot)."""
        self.fast_weights = self.initial_weights.detach().clone()
        for name, value in self.initial_state._buffers.items():
            setattr(self.strategy_state, name, value.clone())
        self.history.clear()

    def _apply(self, fn, recurse=True):
        """Move and cast like any module, except that the memory's floating-point tensors never
        go below float32 (``--trainer.precision bf16-true`` casts the whole model to half): such
        a tensor only moves, its values untouched (casting to half and back would round them)."""
        def at_least_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if out.dtype in HALF_TYPES and t.dtype not in HALF_TYPES:
                return t.to(device=out.device)
            return out
        return super()._apply(at_least_float32, recurse)

    def __getstate__(self):
        """Pickle the strategy as its spec (modules do not pickle; spawned processes reload)."""
        state = dict(self.__dict__)
        state["strategy"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.strategy = load_strategy(self._strategy_spec, probe=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept checkpoints whose slot count differs (per-sequence memory after a batch)."""
        slotted = {"fast_weights": self}
        slotted.update({f"strategy_state.{n}": self.strategy_state for n in self._per_slot})
        for key, owner in slotted.items():
            incoming = state_dict.get(prefix + key)
            name = key.rsplit(".", 1)[-1]
            current = getattr(owner, name)
            if incoming is not None and incoming.shape[1:] == current.shape[1:]:
                setattr(owner, name, current.new_empty(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        strategy = getattr(self.strategy, "__name__", type(self.strategy).__name__)
        return (f"dim={self.dim}, hidden={self.hidden}, num_layers={self.num_layers}, "
                f"strategy={strategy}, slots={self.n_slots}")


def _portable_spec(spec: Any, strategy: Any) -> Any:
    """What to reload the strategy from in another process: its string, file or module name."""
    if isinstance(spec, str):
        return spec
    name = getattr(strategy, "__name__", "")
    if isinstance(strategy, ModuleType):
        if name.startswith(USER_MODULE_PREFIX) and getattr(strategy, "__file__", None):
            return strategy.__file__
        return name
    return strategy  # an object: pickled as itself


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per-slot ``x @ w.T + b``: (S, R, i), (S, o, i), (S, o) -> (S, R, o)."""
    if x.shape[0] == 1:  # one shared slot: a plain matrix product is cheaper
        return torch.addmm(b[0], x[0], w[0].T).unsqueeze(0)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


class _UpdateScratch:
    """What the strategy reports during one update (its gate, recall_error's gradient): plain
    attributes, which ``nn.Module.__setattr__`` would make several times dearer to set."""

    __slots__ = ("gate", "recalled")

    def __init__(self):
        self.gate: Tensor | None = None
        self.recalled: tuple[Tensor, Tensor] | None = None  # (surprise, its weight gradient)


class _FlatViews(dict):
    """The dict :meth:`NeuralMemory.unflatten` returns. It remembers the flat tensor it views, so
    that flattening it again (the usual round trip of a rule) costs nothing, and makes the views
    only when it is first read: a rule that flattens it straight away never pays for them."""

    def __init__(self, flat: Tensor, names: tuple[str, ...], shapes: list[tuple[int, ...]],
                 sizes: list[int]):
        super().__init__()
        self.flat = flat
        self._recipe: tuple | None = (names, shapes, sizes)  # None once the views exist
        self._views: tuple[Tensor, ...] = ()
        self._grad_mode = torch.is_grad_enabled()  # the views behave as if made now

    def _make_views(self) -> None:
        if self.__dict__.get("_recipe") is None:  # made, or being unpickled (items come first)
            return
        names, shapes, sizes = self._recipe
        self._recipe = None
        with torch.set_grad_enabled(self._grad_mode):
            parts = self.flat.split(sizes, dim=1)
            dict.update(self, {n: p.view(self.flat.shape[0], *shape)
                               for n, p, shape in zip(names, parts, shapes)})
        self._views = tuple(dict.values(self))

    def unchanged(self) -> bool:
        """Still exactly the views it was made with (a rule may replace entries)."""
        if self._recipe is not None:
            return True
        return len(self) == len(self._views) and all(
            a is b for a, b in zip(dict.values(self), self._views))


def _reading_makes_views(method):
    def read(self, *args, **kwargs):
        for views in (self, *args):  # the other operand of ==, |, update too
            if isinstance(views, _FlatViews):
                views._make_views()
        return method(self, *args, **kwargs)
    return read


for _name in ("__getitem__", "__iter__", "__len__", "__contains__", "__repr__", "__eq__",
              "__ne__", "__or__", "__ror__", "__ior__", "__reversed__", "__setitem__",
              "__delitem__", "__reduce_ex__", "keys", "values", "items", "get", "copy", "pop",
              "popitem", "setdefault", "update", "clear"):
    setattr(_FlatViews, _name, _reading_makes_views(getattr(dict, _name)))


def _detached(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad else t


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    """(S,) mask -> broadcastable against ``like`` (S, ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))



"""The neural memory: a small MLP whose weights keep learning while the model runs.

Shape legend
    S  memory slots (1 = one memory shared by the whole batch; B = one per sequence)
    R  rows (tokens) per slot in one update or retrieval
    d  embedding width (emb_dim), h  hidden width of the two-layer memory

The fast weights are plain tensors with a leading slot dimension, owned by this module as
buffers: the outer optimiser never sees them, ``state_dict`` saves them, ``reset()`` restores
them. *How* they learn is delegated to a memory strategy (see :mod:`titans_lightning.contract`);
this module owns the weights, the strategy's state and the memory's scope, and is what a
strategy's four functions receive. The pieces around it, one file each:

* :mod:`titans_lightning.memory_network`, the network and the flat layout of its weights;
* :mod:`titans_lightning.memory_update`, the update harness: it takes the gradient of the
  surprise, applies the strategy's new weights only where everything is finite, per slot;
* :mod:`titans_lightning.memory_log`, the per-update statistics, kept as device tensors.

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
from collections.abc import Mapping
from types import MappingProxyType, ModuleType
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .contract import USER_MODULE_PREFIX, StrategyError, did_you_mean, resolve_strategy
from .memory_log import STAT_NAMES, UpdateLog
from .memory_network import FlatLayout, forward, recall_error
from .memory_update import update_memory

__all__ = ["STAT_NAMES", "NeuralMemory", "MemoryAt", "StrategyState", "full_precision",
           "lowered_precision"]

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
            raise KeyError(f"no strategy state named {name!r}{did_you_mean(name, self)}; create "
                           f"it in init_memory_state with memory.register_state({name!r}, tensor)")
        return value

    def __setitem__(self, name: str, value: Tensor) -> None:
        if name not in self:
            raise KeyError(f"strategy state {name!r}{did_you_mean(name, self)} was not registered "
                           "in init_memory_state")
        if isinstance(getattr(self._holder, name), nn.Parameter):
            raise KeyError(f"strategy state {name!r} is learnable; the outer optimiser owns it")
        if not isinstance(value, Tensor):
            raise TypeError(f"strategy state {name!r} must be a tensor, got {type(value).__name__}")
        setattr(self._holder, name, value)

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
        strategy: built-in name, dotted module, ``path/to/file.py``, or a module object. It is
            checked against the contract here; :func:`titans_lightning.load_strategy` (which
            the model uses) also probes it.
        options: hyperparameters the strategy reads from ``memory.options``.
    """

    def __init__(self, dim: int = 16, hidden: int = 32, num_layers: int = 2,
                 strategy: Any = "titans_default", options: dict[str, Any] | None = None):
        super().__init__()
        self.layout = FlatLayout(dim, hidden, num_layers)
        self.strategy = resolve_strategy(strategy, options)
        self.strategy_spec = _portable_spec(strategy, self.strategy)
        self.differentiable = bool(getattr(self.strategy, "DIFFERENTIABLE", False))
        self.reduce = None  # optional hook combining (surprise, grads) across processes
        self.options: dict[str, Any] = dict(options or {})
        self.strategy_state = nn.Module()
        self.per_slot_state: set[str] = set()
        initial = self.layout.initial_weights()  # (1, n_weights)
        self.register_buffer("fast_weights", initial.clone())
        self.register_buffer("initial_weights", initial.clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))
        self._warned_skips = 0
        self._gate: Tensor | None = None  # what apply_update reported for the update in progress
        self.update_log = UpdateLog()
        self._building = True  # state and learnable weights may be created only now
        # the harness's own names, which a view never writes (the rule's own are made after)
        self._harness_names = frozenset(vars(self)) | frozenset(dir(type(self))) | {
            "_harness_names"}
        self.strategy.init_memory_state(self, dim)
        self._building = False
        self.initial_state = nn.Module()  # what reset() restores; saved, so it survives loading
        for name, value in self.strategy_state._buffers.items():
            self.initial_state.register_buffer(name, value.detach().clone())

    # -- sizes and fast weights --------------------------------------------------------------
    @property
    def dim(self) -> int:
        """The width d of the keys, values and queries."""
        return self.layout.dim

    @property
    def hidden(self) -> int:
        """The hidden width of a two-layer memory (unused by a one-layer one)."""
        return self.layout.hidden

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def weight_names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def weights(self) -> dict[str, Tensor]:
        """The current fast weights, ``{name: (S, ...)}`` (views of ``fast_weights``)."""
        return self.unflatten(self.fast_weights)

    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        self.fast_weights = self.flatten(weights)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(S, n_weights) -> ``{name: (S, ...)}`` views, in ``weight_names`` order."""
        return self.layout.unflatten(flat)

    def flatten(self, weights: Mapping[str, Tensor]) -> Tensor:
        """``{name: (S, ...)}`` -> one (S, n_weights) tensor (a rule can then work on it whole)."""
        return self.layout.flatten(weights)

    @property
    def n_slots(self) -> int:
        return self.fast_weights.shape[0]

    def at(self, flat: Tensor) -> MemoryAt:
        """This memory seen with the fast weights ``flat`` (S, n_weights) instead of its own:
        what ``compute_surprise`` receives, with the leaf whose gradient the harness takes. A
        rule that needs the surprise's gradient at other weights (several inner steps) asks
        ``memory.at(w)`` too."""
        return MemoryAt(self, flat)

    def learn_initial_weights(self) -> None:
        """Let the outer optimiser train the starting weights (per-sequence scope)."""
        self._refuse_after_construction("memory.learn_initial_weights()")
        self.initial_weights = nn.Parameter(self.initial_weights.detach().clone())

    def _refuse_after_construction(self, what: str) -> None:
        # A parameter made after the optimiser was built is trained by neither Adam nor DDP,
        # and state made later is missing from the checkpoints of the memory's start.
        if not self.__dict__.get("_building", True):
            raise StrategyError(
                f"memory strategy {self.strategy_spec!r} called {what} outside "
                "init_memory_state: create every parameter and state there, when the memory is "
                "built (the outer optimiser and the checkpoints only know what exists then)")

    def start_sequences(self, n: int) -> None:
        """Per-sequence scope: one slot per sequence, each from the initial weights and state."""
        self.fast_weights = self.initial_weights.expand(n, -1).clone()  # (n, n_weights)
        for name in self.per_slot_state:
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
        return self._retrieve(q, self.fast_weights)

    def recall_error(self, keys: Tensor, values: Tensor) -> Tensor:
        """How badly the memory recalls ``values`` (S, R, d) from ``keys``: per slot, the sum over
        features of the mean over rows of ``(M(keys) - values)^2`` (S,), differentiable with
        respect to the fast weights. The reference's surprise (Eq. 12); one autograd node where
        the CPU kernel applies, so a strategy that uses it updates faster than one that spells
        it out."""
        return recall_error(keys, values, self.fast_weights, self.layout, self.differentiable)

    def _retrieve(self, q: Tensor, flat: Tensor) -> Tensor:
        if q.dtype == flat.dtype and not lowered_precision(q.device.type):
            return forward(q, flat, self.layout)
        with full_precision(q.device.type):
            return forward(q.to(flat.dtype), flat, self.layout).to(q.dtype)

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
            self.per_slot_state.add(name)

    def zeros_like_weights(self) -> dict[str, Tensor]:
        return {n: torch.zeros_like(w) for n, w in self.weights.items()}

    def report_gate(self, rate: Tensor | float) -> None:
        """Called by a gated ``apply_update``: fraction of the update applied, per slot or one."""
        self._gate = torch.as_tensor(rate, dtype=torch.float32, device=self.num_updates.device)

    # -- the update -----------------------------------------------------------------------------
    def update(self, x: Tensor) -> Tensor:
        """One memory update from a chunk of layer outputs ``x`` (S, R, d); returns the surprise
        (S,). See :mod:`titans_lightning.memory_update` for what is checked and rolled back.

        The update runs in the memory's dtype (at least float32), whatever the trainer's
        precision; see :func:`full_precision`.
        """
        x = x.detach()
        if x.dtype == self.fast_weights.dtype and not lowered_precision(x.device.type):
            return update_memory(self, x)
        with full_precision(x.device.type):
            return update_memory(self, x.to(self.fast_weights.dtype))

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def history(self) -> list[dict[str, Tensor | None]]:
        """The records of the updates since the statistics were last read (see
        :class:`~titans_lightning.memory_log.UpdateLog`)."""
        return self.update_log.entries

    def pop_history(self) -> dict[str, Tensor]:
        """Statistics of the updates since the last call, ``{name: (U, S)}``, and clear them."""
        return self.update_log.pop()

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
        self.strategy = resolve_strategy(self.strategy_spec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept checkpoints whose slot count differs (per-sequence memory after a batch)."""
        slotted = {"fast_weights": self}
        slotted.update({f"strategy_state.{n}": self.strategy_state for n in self.per_slot_state})
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


def _the_memorys(name: str) -> property:
    """A read-only attribute of a view that is the memory's own ``name``."""
    return property(lambda view: getattr(view._memory, name))


class MemoryAt:
    """The memory seen with other fast weights ``flat`` (S, n_weights): what ``compute_surprise``
    receives (see :meth:`NeuralMemory.at`). A view only computes a surprise, and offers only
    what one reads, this class's public names (an allow-list):

    * at the view's weights: ``fast_weights`` (``flat`` itself), ``weights``, ``n_slots``,
      ``retrieve``, ``recall_error``, and ``at`` (the memory at yet other weights);
    * the memory's own: ``state`` (read ``state[name]``, learned projections included; assign
      ``state[name] = tensor``, as ``delta_energy`` and ``omega_window`` do, which the harness
      checks and rolls back as any new state), ``options`` (read-only), the sizes ``dim``,
      ``hidden``, ``num_layers`` and ``weight_names``, ``flatten`` and ``unflatten``, whether
      the rule keeps its graph (``differentiable``), whether the model trains (``training``),
      and the hook combining a surprise and its gradient across processes (``reduce``);
    * private attributes of the rule's own (``_name``), such as multi_step's
      ``_multi_step_chunk``: set on a view, they are set on the memory, as plain attributes,
      for the update's ``apply_update``.

    Everything else raises AttributeError: the memory itself, its history, counters, initial
    state and scope, its methods (``reset``, ``start_sequences``, ``to``, ``train``,
    ``load_state_dict``, ...), and every other write, the harness's private attributes too.

    What the guard does not cover: the tensors it hands out are the memory's own, so an in-place
    edit reaches the memory. The harness detects those of the fast weights and of the state's
    buffers after every update and stops the run with a StrategyError (the edit itself stays);
    autograd refuses them on a learnable tensor while grad is on (as in ``compute_surprise``),
    though not through ``.data``. ``compute_keys_values`` and ``apply_update`` receive the
    memory itself, unguarded. And Python hides nothing: ``_memory`` is the memory. The guard
    stops a rule's mistakes, not a rule set on getting around it.
    """

    __slots__ = ("_memory", "_flat")

    def __init__(self, memory: NeuralMemory, flat: Tensor):
        object.__setattr__(self, "_memory", memory)
        object.__setattr__(self, "_flat", flat)

    # -- at the view's weights ---------------------------------------------------------------
    @property
    def fast_weights(self) -> Tensor:
        return self._flat

    @property
    def weights(self) -> dict[str, Tensor]:
        return self._memory.unflatten(self._flat)

    @property
    def n_slots(self) -> int:
        return self._flat.shape[0]

    def retrieve(self, q: Tensor) -> Tensor:
        return self._memory._retrieve(q, self._flat)

    def recall_error(self, keys: Tensor, values: Tensor) -> Tensor:
        memory = self._memory
        return recall_error(keys, values, self._flat, memory.layout, memory.differentiable)

    def at(self, flat: Tensor) -> MemoryAt:
        return MemoryAt(self._memory, flat)

    # -- the memory's own, to read -------------------------------------------------------------
    state = _the_memorys("state")  # a StrategyState
    dim = _the_memorys("dim")
    hidden = _the_memorys("hidden")
    num_layers = _the_memorys("num_layers")
    weight_names = _the_memorys("weight_names")
    flatten = _the_memorys("flatten")  # the memory's own methods: its layout, not its weights
    unflatten = _the_memorys("unflatten")
    differentiable = _the_memorys("differentiable")
    training = _the_memorys("training")
    reduce = _the_memorys("reduce")

    @property
    def options(self) -> Mapping[str, Any]:
        return MappingProxyType(self._memory.options)

    # -- everything else: the rule's own private attributes, or refused ---------------------------
    def __getattr__(self, name: str) -> Any:
        memory = object.__getattribute__(self, "_memory")
        if _is_the_rules(memory, name) and name in vars(memory):
            return vars(memory)[name]
        raise AttributeError(_refusal(name, "is not available on a view of the memory"))

    def __setattr__(self, name: str, value: Any) -> None:
        if not _is_the_rules(self._memory, name):
            raise AttributeError(_refusal(name, "cannot be set"))
        object.__setattr__(self._memory, name, value)  # plain: never a parameter or buffer

    def __delattr__(self, name: str) -> None:
        if not (_is_the_rules(self._memory, name) and name in vars(self._memory)):
            raise AttributeError(_refusal(name, "cannot be deleted"))
        object.__delattr__(self._memory, name)


_OFFERED = tuple(name for name in vars(MemoryAt) if not name.startswith("_"))


def _is_the_rules(memory: NeuralMemory, name: str) -> bool:
    """Whether ``name`` is a private attribute of the rule's own: not the harness's, nor the
    view's own (set on the memory, it would not change the view)."""
    return (name.startswith("_") and not name.startswith("__")
            and name not in memory._harness_names and name not in MemoryAt.__slots__)


def _refusal(name: str, what: str) -> str:
    return (f"memory.at(...).{name} {what}: a view only computes a surprise, and the harness "
            "owns the memory itself (its weights, state, history and scope). A view offers "
            f"{', '.join(_OFFERED)}, and private attributes of the rule's own "
            "(memory._my_value = ..., read back in apply_update). A rule changes the weights by "
            "returning them from apply_update and its state by assigning memory.state[name] = "
            "tensor")


def _portable_spec(spec: Any, strategy: Any) -> Any:
    """What to reload the strategy from in another process: its string, its file, its short
    name for a built-in, or its module name."""
    if isinstance(spec, str):
        return spec
    name = getattr(strategy, "__name__", "")
    if isinstance(strategy, ModuleType):
        if name.startswith(USER_MODULE_PREFIX) and getattr(strategy, "__file__", None):
            return strategy.__file__
        builtin = f"{__package__}.strategies."
        return name[len(builtin):] if name.startswith(builtin) else name
    return strategy  # an object: pickled as itself

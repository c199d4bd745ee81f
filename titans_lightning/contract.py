"""The memory-strategy contract, and the one place where a strategy string becomes a strategy.

A *memory strategy* decides how the neural memory learns at test time. It is any Python module
(or object) with exactly these four functions; the harness
(:class:`~titans_lightning.memory.NeuralMemory`) calls them, in this order, once per update::

    init_memory_state(memory, emb_dim)             # once, at construction
    keys, values = compute_keys_values(memory, x)  # x: (S, R, d) detached layer outputs
    surprise = compute_surprise(memory, keys, values)   # (S,) one loss per memory slot
    new_weights = apply_update(memory, grads, surprise) # {name: (S, ...)} like memory.weights

Shapes: ``S`` memory slots (1 for the shared memory, one per sequence for per-sequence memory),
``R`` rows per slot (the chunk's tokens), ``d`` the embedding width.

* ``init_memory_state`` creates the key/value projections and any optimiser state (momentum,
  moments, learning rates, running statistics) with :meth:`NeuralMemory.register_state`. State is
  owned by the memory: it is saved in ``state_dict``, restored by ``reset()``, moved by ``.to()``.
  Hyperparameters come from ``memory.options`` (the ``strategy_options`` of the config), with the
  strategy's own defaults.
* ``compute_keys_values`` maps the chunk's layer outputs to the (keys, values) the memory should
  associate.
* ``compute_surprise`` is the loss that drives the update, computed through the fast weights with
  ``memory.retrieve(keys)``; it returns one value per slot. The harness takes its gradient with
  respect to every fast weight. ``memory.recall_error(keys, values)`` is the reference's MSE
  surprise in one autograd node. Its ``memory`` is the memory seen at the weights being
  differentiated (``memory.at(leaf)``, a :class:`~titans_lightning.memory.MemoryAt`): not the
  ``nn.Module`` itself, but a view that offers what a surprise reads (the weights, ``state``,
  read-only ``options``, sizes, ``retrieve``, ``recall_error``, ``at``) and the rule's own
  private attributes (``memory._mine = ...``, read back in ``apply_update``), and refuses the
  rest (the memory's methods, history and counters) with an AttributeError.
* ``apply_update`` receives ``grads`` (same names and shapes as ``memory.weights``; read them,
  never change them in place: the harness checks and records them after the rule) and returns
  the new fast weights. It reads state with ``memory.state[name]`` and writes new state by
  *assigning* ``memory.state[name] = new_tensor`` (never in place: the harness keeps the old
  tensor so that a non-finite update can be rolled back). A gated rule reports the fraction of
  the update it applied with ``memory.report_gate(rate)``; ungated rules need not (rate 1.0).

Options: a rule declares the options it reads as a module-level ``DEFAULTS = {name: default}``,
and declaring them is how it gets them checked. :func:`resolve_strategy` then refuses an option that
``DEFAULTS`` does not hold (naming the near miss: ``thetta``, did you mean ``theta``?) and a value
of another type than its default (a number for a float, a whole number for an int, a bool for a
bool; a bool is not a number), so a typo cannot silently run the rule with its default. A rule
without ``DEFAULTS`` gets its options as they are, unchecked.

Optional, beyond the four functions: ``DIFFERENTIABLE = True`` keeps the graph of every update
while training (the outer optimiser then learns ``learnable=True`` state through the memory's
updates); ``reduce_across_ranks(memory, surprise, grads, rows)`` replaces how the surprise and
gradients are combined across processes under DDP (see :mod:`titans_lightning.distributed`).

Strategy strings (the config stores only the string, so checkpoints stay portable):
a built-in name (any module of :mod:`titans_lightning.strategies`, e.g. ``titans_default``), a
dotted module (``my_pkg.my_rule``), or a path to a ``.py`` file (``path/to/custom_memory.py``;
``examples/custom_memory.py`` is a template to copy).

This module imports nothing of the package, so the memory (which checks a strategy against the
contract when it is built) and the loader (:mod:`titans_lightning.strategy`, which also runs the
strategy once on tiny tensors, the *probe*, and so needs the memory) both depend on it, and not
on each other. :func:`resolve_strategy` turns a spec into a checked strategy without running it.
"""
from __future__ import annotations

import contextvars
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import pkgutil
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

CONTRACT: dict[str, tuple[str, ...]] = {
    "init_memory_state": ("memory", "emb_dim"),
    "compute_keys_values": ("memory", "x"),
    "compute_surprise": ("memory", "keys", "values"),
    "apply_update": ("memory", "grads", "surprise"),
}
USER_MODULE_PREFIX = "titans_user_strategy_"  # module names of strategies loaded from files

PROBING = contextvars.ContextVar("titans_strategy_probing", default=False)  # set by the probe


class StrategyError(ValueError):
    """A strategy could not be loaded or does not honour the four-function contract."""


def probing() -> bool:
    """Whether the strategy probe is running (its own wrapper names what failed)."""
    return PROBING.get()


def builtin_strategies() -> tuple[str, ...]:
    """Names of the built-in strategies: the modules of :mod:`titans_lightning.strategies`."""
    folder = Path(__file__).with_name("strategies")  # found, not imported
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(folder)])
                        if not m.ispkg and not m.name.startswith("_")))


def _signature(name: str) -> str:
    return f"{name}({', '.join(CONTRACT[name])})"


def resolve_strategy(spec: str | ModuleType | Any, options: Mapping[str, Any] | None = None
                     ) -> Any:
    """Resolve ``spec`` (built-in name, dotted module, ``.py`` path or object) and check it
    against the contract, and ``options`` against the strategy's ``DEFAULTS`` where it declares
    them. It does not run the strategy: :func:`titans_lightning.strategy.load_strategy` adds
    the probe."""
    strategy = _resolve(spec) if isinstance(spec, str) else spec
    where = describe(spec)
    check_contract(strategy, where)
    if options:
        check_options(strategy, where, options)
    return strategy


def check_contract(strategy: Any, where: str) -> None:
    """Raise :class:`StrategyError` naming the first missing or mis-signed function."""
    for name, params in CONTRACT.items():
        fn = getattr(strategy, name, None)
        if fn is None or not callable(fn):
            raise StrategyError(
                f"memory strategy {where} has no function `{name}`; every strategy must define "
                f"all four of: {', '.join(_signature(n) for n in CONTRACT)}"
            )
        try:
            signature = inspect.signature(fn)
        except ValueError:  # builtins without an introspectable signature
            continue
        try:
            signature.bind(*params)
        except TypeError as err:
            raise StrategyError(
                f"memory strategy {where}: `{name}` has the signature {name}{signature}, "
                f"expected {_signature(name)}: {_arity_problem(signature, len(params), err)}"
            ) from None


def _arity_problem(signature: inspect.Signature, n: int, err: TypeError) -> str:
    """Why ``n`` positional arguments (what the harness passes) do not bind to ``signature``."""
    kinds = inspect.Parameter
    params = signature.parameters.values()
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY,
                                                  kinds.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    keyword_only = [p.name for p in params if p.kind is kinds.KEYWORD_ONLY and p.default is p.empty]
    if len(positional) < n and not any(p.kind is kinds.VAR_POSITIONAL for p in params):
        return f"too few parameters (it takes {len(positional)}, the harness passes {n})"
    if len(required) > n:
        return f"too many parameters (it requires {len(required)}, the harness passes {n})"
    if keyword_only:
        return (f"too many parameters (keyword-only {', '.join(keyword_only)}, which the harness "
                "never passes)")
    return str(err)


def check_options(strategy: Any, where: str, options: Mapping[str, Any]) -> None:
    """Refuse an option the strategy's ``DEFAULTS`` does not declare, or a value of another type.

    Unchecked, a misspelt option (``thetta``) would run the rule silently with its default, and
    a string would fail deep inside an update. A strategy without ``DEFAULTS`` is not checked.
    """
    declared = getattr(strategy, "DEFAULTS", None)
    if not isinstance(declared, Mapping):
        return
    for key, value in options.items():
        if key not in declared:
            raise StrategyError(
                f"memory strategy {where} has no option {key!r}{did_you_mean(key, declared)}; "
                f"the options it declares (its DEFAULTS) are {', '.join(map(str, declared))}")
        expected = _expected_type(declared[key], value)
        if expected is not None:
            raise StrategyError(
                f"memory strategy {where}: option {key!r} must be {expected}, like its default "
                f"{declared[key]!r}; got {show(value)}")


def _expected_type(default: Any, value: Any) -> str | None:
    """What ``value`` should be, judged by the option's default; None where it fits.

    A bool is not a number here (True would pass for 1), an int is a fine float, and a whole
    float a fine int (2.0 steps); None as the default accepts anything.
    """
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false (a bool)"
    if isinstance(default, numbers.Integral):
        whole = isinstance(value, numbers.Integral) or (
            is_number and math.isfinite(value) and float(value).is_integer())
        return None if is_number and whole else "a whole number (an int, or a float such as 2.0)"
    if isinstance(default, numbers.Real):
        return None if is_number else "a number (an int or a float)"
    return None if isinstance(value, type(default)) else f"a {type(default).__name__}"


def did_you_mean(name: Any, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelt ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def show(value: Any) -> str:
    """A short description of a returned value: types and shapes, not contents."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(map(show, value))})"
    if isinstance(value, Mapping):
        return "a dict {" + ", ".join(f"{k!r}: {show(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# -- resolving a string -------------------------------------------------------------------------
def describe(spec: Any) -> str:
    """How errors name a strategy: its spec string, or the name of its module or object."""
    if isinstance(spec, str):
        return repr(spec)
    return repr(getattr(spec, "__name__", type(spec).__name__))


def strategy_source(spec: str) -> dict[str, str] | None:
    """The source of a user strategy, ``{"file", "sha256", "source"}``, kept with checkpoints
    and results so that they say which rule produced them even after the file is edited or
    moved; None for a built-in (the package's commit identifies it)."""
    if not isinstance(spec, str) or spec in builtin_strategies() or not spec.strip():
        return None
    if is_path(spec):
        path = Path(spec) if spec.endswith(".py") else None  # others: load_strategy says why
    else:
        try:
            found = importlib.util.find_spec(spec)
        except (ImportError, ValueError):  # a missing parent package: load_strategy says so
            found = None
        path = Path(found.origin) if found is not None and found.origin else None
    if path is None or not path.is_file():
        return None
    text = path.read_text()
    return {"file": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "source": text}


KINDS_OF_SPEC = ("a built-in name ({builtins}), a dotted module (my_pkg.my_rule) or a path to a "
                 ".py file (path/to/rule.py)")


def is_path(spec: str) -> bool:
    """Whether ``spec`` names a file rather than a module: a .py name, a separator, a file."""
    return (spec.endswith(".py") or "/" in spec or "\\" in spec
            or (bool(Path(spec).suffix) and Path(spec).is_file()))


def _resolve(spec: str) -> ModuleType:
    builtins = builtin_strategies()
    kinds = KINDS_OF_SPEC.format(builtins=", ".join(builtins))
    if not spec.strip():
        raise StrategyError(f"the memory strategy (--model.strategy) is an empty string; pass "
                            f"{kinds}")
    if is_path(spec):
        return _load_file(Path(spec))
    name = f"{__package__}.strategies.{spec}" if spec in builtins else spec
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.startswith(err.name):
            raise StrategyError(
                f"unknown memory strategy {spec!r}{did_you_mean(spec, builtins)}: not a built-in "
                f"({', '.join(builtins)}), not an importable module, and not a path to a .py file"
            ) from None
        raise


def _load_file(path: Path) -> ModuleType:
    if path.suffix != ".py":
        beside = path.with_suffix(".py") if path.name else None  # "/" has no name to suffix
        hint = f" (did you mean {str(beside)!r}?)" if beside and beside.is_file() else ""
        raise StrategyError(
            f"memory strategy {str(path)!r} looks like a path but does not end in .py{hint}; a "
            "strategy file must be a Python file, path/to/rule.py (or pass a built-in name or a "
            "dotted module)")
    if not path.is_file():
        raise StrategyError(
            f"memory strategy file {str(path)!r} not found (resolved to {path.resolve()}); "
            "pass a built-in name, a dotted module, or an existing path/to/strategy.py"
        )
    module_name = f"{USER_MODULE_PREFIX}{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # registered while it runs, as an import would (dataclasses)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's own error, with the user's own traceback
        del sys.modules[module_name]
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        raise StrategyError(
            f"memory strategy file {str(path)!r} failed to import: "
            f"{type(err).__name__}: {err}\n{tb}"
        ) from err
    return module

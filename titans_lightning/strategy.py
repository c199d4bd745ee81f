"""The memory-strategy contract, and the one place where a strategy string becomes a strategy.

A *memory strategy* decides how the neural memory learns at test time. It is any Python module
(or object) with exactly these four functions; the harness (:class:`~titans_lightning.memory.NeuralMemory`)
calls them, in this order, once per memory update::

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
  respect to every fast weight.
* ``apply_update`` receives ``grads`` (same names and shapes as ``memory.weights``) and returns
  the new fast weights. It reads state with ``memory.state[name]`` and writes new state by
  *assigning* ``memory.state[name] = new_tensor`` (never in place: the harness keeps the old
  tensor so that a non-finite update can be rolled back). A gated rule reports the fraction of
  the update it applied with ``memory.report_gate(rate)``; ungated rules need not (rate 1.0).

Strategy strings (the config stores only the string, so checkpoints stay portable):
a built-in name (``titans_default``), a dotted module (``my_pkg.my_rule``), or a path to a
``.py`` file (``path/to/custom_memory.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

CONTRACT: dict[str, tuple[str, ...]] = {
    "init_memory_state": ("memory", "emb_dim"),
    "compute_keys_values": ("memory", "x"),
    "compute_surprise": ("memory", "keys", "values"),
    "apply_update": ("memory", "grads", "surprise"),
}

BUILTIN = ("titans_default", "adam_gated", "contrastive_ema", "delta_anchor")


class StrategyError(ValueError):
    """A strategy could not be loaded or does not honour the four-function contract."""


def _signature(name: str) -> str:
    return f"{name}({', '.join(CONTRACT[name])})"


def load_strategy(spec: str | ModuleType | Any) -> Any:
    """Resolve ``spec`` (built-in name, dotted module, ``.py`` path or object) and check it."""
    strategy = _resolve(spec) if isinstance(spec, str) else spec
    check_contract(strategy, _describe(spec))
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
            inspect.signature(fn).bind(*params)
        except TypeError as err:
            raise StrategyError(
                f"memory strategy {where}: `{name}` has the signature "
                f"{name}{inspect.signature(fn)}, expected {_signature(name)} ({err})"
            ) from None
        except ValueError:  # builtins without an introspectable signature
            continue


def _describe(spec: Any) -> str:
    if isinstance(spec, str):
        return repr(spec)
    return repr(getattr(spec, "__name__", type(spec).__name__))


def _resolve(spec: str) -> ModuleType:
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return _load_file(Path(spec))
    name = f"titans_lightning.strategies.{spec}" if spec in BUILTIN else spec
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.startswith(err.name):
            raise StrategyError(
                f"unknown memory strategy {spec!r}: not a built-in ({', '.join(BUILTIN)}), "
                f"not an importable module, and not a path to a .py file"
            ) from None
        raise


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise StrategyError(
            f"memory strategy file {str(path)!r} not found (resolved to {path.resolve()}); "
            "pass a built-in name, a dotted module, or an existing path/to/strategy.py"
        )
    module_name = f"titans_user_strategy_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's own error, with the user's own traceback
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        raise StrategyError(
            f"memory strategy file {str(path)!r} failed to import: "
            f"{type(err).__name__}: {err}\n{tb}"
        ) from err
    sys.modules[module_name] = module
    return module

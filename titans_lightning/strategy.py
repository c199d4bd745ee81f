"""The strategy loader: a strategy spec becomes a strategy that has been seen to work.

:func:`load_strategy` resolves a spec and checks it against the four-function contract (both in
:mod:`titans_lightning.contract`, which documents the contract), then runs a *probe*: the four
functions on tiny tensors (a throwaway ``NeuralMemory(dim=4, hidden=8)`` updated twice with a
random (1, 3, 4) chunk, then once with two slots as per-sequence memory), checking what each
returns. A broken rule thus fails when the model is built, with a :class:`StrategyError` naming
the function, not deep inside a training run. The probe runs once per strategy and options, and
leaves the global random state as it was. The model loads its strategy here; a
:class:`~titans_lightning.memory.NeuralMemory` built directly checks the contract but does not
probe.
"""
from __future__ import annotations

import traceback
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

from .contract import (CONTRACT, KINDS_OF_SPEC, PROBING, USER_MODULE_PREFIX, StrategyError,
                       builtin_strategies, check_contract, check_options, describe,
                       did_you_mean, probing, resolve_strategy, show, strategy_source)
from .memory import NeuralMemory

__all__ = ["CONTRACT", "KINDS_OF_SPEC", "USER_MODULE_PREFIX", "StrategyError", "builtin_strategies",
           "check_contract", "check_options", "did_you_mean", "load_strategy", "probe_strategy",
           "probing", "strategy_source"]

PROBE_DIM, PROBE_HIDDEN, PROBE_ROWS = 4, 8, 3
PROBE = (f"a throwaway NeuralMemory(dim={PROBE_DIM}, hidden={PROBE_HIDDEN}) updated twice with "
         f"a random (1, {PROBE_ROWS}, {PROBE_DIM}) chunk, then once with two slots, "
         f"(2, {PROBE_ROWS}, {PROBE_DIM})")

_probed: dict[tuple, Any] = {}  # strategies (and options) that passed, kept alive by the key


def __getattr__(name: str) -> Any:
    if name == "BUILTIN":  # the built-in names, discovered rather than listed by hand
        return builtin_strategies()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_strategy(spec: str | ModuleType | Any, probe: bool = True,
                  options: Mapping[str, Any] | None = None) -> Any:
    """Resolve ``spec`` (built-in name, dotted module, ``.py`` path or object) and check it.

    ``options`` are checked against the strategy's ``DEFAULTS``, where it declares them.
    ``probe`` runs the four functions once on tiny tensors (with ``options`` as
    ``memory.options``); a strategy that passed is not probed again with the same options.
    """
    strategy = resolve_strategy(spec, options)
    if probe and not probing():
        probe_strategy(strategy, describe(spec), options)
    return strategy


# -- the probe ----------------------------------------------------------------------------------
def probe_strategy(strategy: Any, where: str, options: Mapping[str, Any] | None = None) -> None:
    """Build a tiny memory with ``strategy`` and update it; raise :class:`StrategyError` naming
    the function that failed or returned the wrong thing."""
    key = (*(getattr(strategy, n) for n in CONTRACT), repr(sorted((options or {}).items())))
    try:
        if key in _probed:
            return
    except TypeError:  # unhashable callables: probe every time
        key = None
    traced = _Traced(strategy, where)
    token = PROBING.set(True)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"), \
                torch.inference_mode(False), torch.enable_grad():
            torch.default_generator.manual_seed(0)
            memory = NeuralMemory(PROBE_DIM, PROBE_HIDDEN, 2, traced, dict(options or {}))
            for _ in range(2):  # the second update sees the state the first one wrote
                memory.update(torch.randn(1, PROBE_ROWS, PROBE_DIM))
            memory.start_sequences(2)  # per-sequence scope: one slot per sequence
            memory.update(torch.randn(2, PROBE_ROWS, PROBE_DIM))
    except _FunctionFailed as failed:
        err = failed.error  # its traceback, less the frame of the tracing wrapper
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__.tb_next))
        raise StrategyError(
            f"memory strategy {where}: `{failed.name}` raised {type(err).__name__}: {err} "
            f"on the probe call ({PROBE})\n{tb}"
        ) from err
    except StrategyError:
        raise
    except Exception as err:  # the harness failed on what the strategy returned
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        after = f" after `{traced.last}` returned" if traced.last else ""
        raise StrategyError(
            f"memory strategy {where}: the memory update failed{after} on the probe call "
            f"({PROBE}): {type(err).__name__}: {err}\n{tb}"
        ) from err
    finally:
        PROBING.reset(token)
    _check_finite(memory, where)
    if key is not None:
        _probed[key] = strategy


class _FunctionFailed(Exception):
    def __init__(self, name: str, error: BaseException):
        super().__init__(name)
        self.name, self.error = name, error


class _Traced:
    """The strategy seen by the probe's memory: each call is attributed and its result checked."""

    def __init__(self, strategy: Any, where: str):
        self._strategy, self._where, self.last = strategy, where, None

    def __getattr__(self, name: str) -> Any:  # anything else the strategy exposes
        if name == "_strategy":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._strategy, name)

    def _call(self, name: str, *args: Any) -> Any:
        self.last = name
        try:
            return getattr(self._strategy, name)(*args)
        except Exception as err:
            raise _FunctionFailed(name, err) from err

    def _wrong(self, name: str, expected: str, got: Any) -> StrategyError:
        return StrategyError(f"memory strategy {self._where}: `{name}` must return {expected}; "
                             f"on the probe call ({PROBE}) it returned {show(got)}")

    def init_memory_state(self, memory, emb_dim):
        self._call("init_memory_state", memory, emb_dim)

    def compute_keys_values(self, memory, x):
        out = self._call("compute_keys_values", memory, x)
        S = x.shape[0]
        ok = (isinstance(out, (tuple, list)) and len(out) == 2
              and all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == S
                      for t in out)
              and out[0].shape[1] == out[1].shape[1])
        if not ok:
            raise self._wrong("compute_keys_values", "a pair (keys, values) of (S, R, d') tensors "
                              f"with the same S and R (here S={S}, x {tuple(x.shape)})", out)
        return out

    def compute_surprise(self, memory, keys, values):
        out = self._call("compute_surprise", memory, keys, values)
        S = memory.n_slots
        if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (S,)
                and out.is_floating_point()):
            raise self._wrong("compute_surprise", f"a float tensor of shape (S,) = ({S},), one "
                              "surprise per memory slot", out)
        if not out.requires_grad:
            raise StrategyError(
                f"memory strategy {self._where}: `compute_surprise` returned a surprise that does "
                "not depend on the fast weights (requires_grad is False), so the harness cannot "
                "take its gradient; compute it through memory.retrieve(keys), with autograd on")
        return out

    def apply_update(self, memory, grads, surprise):
        out = self._call("apply_update", memory, grads, surprise)
        expected = {n: tuple(w.shape) for n, w in memory.weights.items()}
        if not (isinstance(out, Mapping) and set(out) == set(expected)
                and all(isinstance(out[n], torch.Tensor) and tuple(out[n].shape) == shape
                        for n, shape in expected.items())):
            want = ", ".join(f"{n!r}: {shape}" for n, shape in expected.items())
            raise self._wrong("apply_update", "a dict with exactly the fast weights' names and "
                              f"shapes, like memory.weights {{{want}}}", out)
        return out


def _check_finite(memory: Any, where: str) -> None:
    """Warn if the probe's updates were skipped (not an error: the harness skips them safely)."""
    if int(memory.skipped_updates) == 0:
        return
    history = memory.history  # one entry per update; the slot count changes along the probe
    if not all(torch.isfinite(h["surprise"]).all() for h in history):
        name, what = "compute_surprise", "a non-finite surprise"
    elif not all(torch.isfinite(h["grads"]).all() for h in history):
        name, what = "compute_surprise", "a surprise with a non-finite gradient"
    else:
        name, what = "apply_update", "non-finite weights"
    warnings.warn(f"memory strategy {where}: `{name}` produced {what} on the probe call ({PROBE}); "
                  "the harness skips such updates, keeping the previous weights and state",
                  RuntimeWarning, stacklevel=4)



"""What the harness's own paths for the built-in rules gain, in one process.

    python benchmarks/own_path.py [--batches 9] [--warmup 2] [--threads 1] [--contexts 16 32]
                                  [--out FILE.jsonl]

Three models of the same seed run ``titans_default``'s update three ways:
- ``own``: the built-in module, which the harness updates without the contract's round trips
  (``titans_lightning.memory_update._titans_default_update``);
- ``shortcut``: a copy of its four functions in another object, so the general path (the four
  functions, their checks, the commit), which still takes the surprise and its gradient from one
  call because the copy's ``compute_surprise`` is titans_default's own;
- ``general``: the same copy with a ``compute_surprise`` of its own (the same expression), so
  the surprise's gradient comes from autograd, as for any user's rule.
Their predictions must agree (bit for bit, or to float rounding for ``general``); then their
training and evaluation batches are timed alternately, as ``compare_commits.py`` times two
commits. Prints the medians and each one's ratio to ``general`` (below 1: faster); ``--out``
appends them as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import types

import torch

from compare_commits import add_alternating_options, compare, sine_batch  # beside this file
from throughput import append_record, start
from titans_lightning import MACTitan
from titans_lightning.contract import CONTRACT
from titans_lightning.strategies import titans_default


def rule_copy(**overrides) -> types.SimpleNamespace:
    functions = {name: getattr(titans_default, name) for name in CONTRACT}
    return types.SimpleNamespace(__name__="titans_default_copy", DEFAULTS=titans_default.DEFAULTS,
                                 **{**functions, **overrides})


def recall_error(memory, keys, values):
    return memory.recall_error(keys, values)  # titans_default's surprise, another function


RULES = {"own": "titans_default", "shortcut": rule_copy(),
         "general": rule_copy(compute_surprise=recall_error)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_alternating_options(parser)
    args = parser.parse_args()
    started = start()
    torch.set_num_threads(args.threads)
    batch = sine_batch()
    result, every_batch = {}, {}
    for C in args.contexts:
        models = {}
        for key, rule in RULES.items():
            torch.manual_seed(0)
            models[key] = MACTitan(context_window=C, strategy=rule).eval()
        with torch.no_grad():
            preds = {key: model(batch)[0] for key, model in models.items()}
        if not torch.equal(preds["own"], preds["shortcut"]):
            raise SystemExit(f"C={C}: the own path and the general one predict differently")
        torch.testing.assert_close(preds["general"], preds["own"], rtol=1e-4, atol=1e-5)
        for mode, train in (("train", True), ("eval", False)):
            times = compare(models, batch, train, args.batches, args.warmup)
            medians = {k: statistics.median(v) for k, v in times.items()}
            result[f"{mode}_c{C}"] = {
                **{f"{k}_s": round(m, 4) for k, m in medians.items()},
                **{f"{k}_ratio": round(medians[k] / medians["general"], 3)
                   for k in ("own", "shortcut")}}
            every_batch[f"{mode}_c{C}"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
            print(f"C={C} {mode}: " + ", ".join(f"{k} {m:.3f}" for k, m in medians.items())
                  + f" s/batch; own / general {medians['own'] / medians['general']:.3f}, "
                  f"shortcut / general {medians['shortcut'] / medians['general']:.3f}",
                  flush=True)
    if args.out:
        append_record(args, result, every_batch, torch.device("cpu"), started)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

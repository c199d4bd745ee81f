"""Seconds per batch of this checkout's MACTitan against another commit's, in one process.

    python benchmarks/compare_commits.py --against COMMIT [--batches 9] [--warmup 2]
                                         [--threads 1] [--contexts 16 32] [--out FILE.jsonl]

The other commit's ``titans_lightning`` is extracted (``git archive``) into a temporary folder and
imported under another name, so both versions live in this process. Both models are built from
the same seed, each with its own package's default rule (a strategy string would resolve to this
checkout's), on the benchmark's shapes (batch 4, 500 steps, sinwave-like), their predictions are
compared (a refactor must not change the numbers), and then their training batches (forward,
loss, backward, Adam step) and evaluation batches (no outer gradient; the memory still learns)
are timed alternately, batch by batch, with the order swapped every round, so that the machine's
load falls on both alike. Prints the median of each and the ratio of this checkout to the other
(below 1: this checkout is faster); ``--out`` appends the figures, every batch's time, both
commits, the device and the wall time as one JSON line.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from throughput import append_record, start, one_batch  # beside this file
from titans_lightning import MACTitan

REPOSITORY = Path(__file__).resolve().parents[1]


def import_package_at(commit: str, folder: Path) -> str:
    """Import ``titans_lightning`` as it was at ``commit``, under a name of its own; return it."""
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", commit, "titans_lightning"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    name = f"titans_lightning_at_{commit[:12]}"
    source = folder / "titans_lightning"
    spec = importlib.util.spec_from_file_location(name, source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return name


def compare(models: dict, batch: torch.Tensor, train: bool, n: int, warmup: int
            ) -> dict[str, list[float]]:
    """Every batch's seconds per model, the models taking turns (order swapped each round)."""
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    for model in models.values():
        model.train(train)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for i in range(warmup + n):
        for key in order if i % 2 == 0 else order[::-1]:
            seconds = one_batch(models[key], optimizers[key], batch, train)
            if i >= warmup:
                times[key].append(seconds)
    return times


def add_alternating_options(parser: argparse.ArgumentParser) -> None:
    """The options of a script that times models alternately with :func:`compare`."""
    parser.add_argument("--batches", type=int, default=9, help="timed batches per model and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 32],
                        help="context windows to time (default: 16 32)")
    parser.add_argument("--out", help="append the comparison to this JSON-lines file")


def sine_batch() -> torch.Tensor:
    """The benchmark's batch shape, sinwave-like: (4, 500, 1)."""
    return torch.sin(torch.linspace(0, 60, 500)).repeat(4, 1)[..., None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the commit to compare with")
    add_alternating_options(parser)
    args = parser.parse_args()
    started = start()
    torch.set_num_threads(args.threads)
    against = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", args.against],
                             check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as folder:
        other_package = import_package_at(against, Path(folder))
        other = importlib.import_module(f"{other_package}.model")
        # its own default rule: a strategy string would resolve to this checkout's package
        other_rule = importlib.import_module(f"{other_package}.strategies.titans_default")
        batch = sine_batch()
        result, every_batch = {}, {}
        for C in args.contexts:
            models = {}
            for key, build, rule in (("this", MACTitan, "titans_default"),
                                     ("other", other.MACTitan, other_rule)):
                torch.manual_seed(0)
                models[key] = build(context_window=C, strategy=rule).eval()
            with torch.no_grad():
                torch.manual_seed(1)
                mine = models["this"](batch)[0]
                torch.manual_seed(1)
                theirs = models["other"](batch)[0]
            result[f"max_abs_prediction_difference_c{C}"] = float((mine - theirs).abs().max())
            for mode, train in (("train", True), ("eval", False)):
                times = compare(models, batch, train, args.batches, args.warmup)
                medians = {k: statistics.median(v) for k, v in times.items()}
                ratio = medians["this"] / medians["other"]
                result[f"{mode}_c{C}"] = {"this_s": round(medians["this"], 4),
                                          "other_s": round(medians["other"], 4),
                                          "ratio": round(ratio, 3)}
                every_batch[f"{mode}_c{C}"] = {k: [round(t, 4) for t in v]
                                               for k, v in times.items()}
                print(f"C={C} {mode}: this {medians['this']:.3f} s/batch, {args.against} "
                      f"{medians['other']:.3f} s/batch, ratio {ratio:.3f}", flush=True)
            print(f"C={C} largest prediction difference "
                  f"{result[f'max_abs_prediction_difference_c{C}']:.2e}", flush=True)
    if args.out:
        append_record(args, result, every_batch, torch.device("cpu"), started, against=against)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

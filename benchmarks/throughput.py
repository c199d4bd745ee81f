"""Seconds per batch of the benchmark MACTitan (batch 4, 500 steps, sinwave shapes).

    python benchmarks/throughput.py [--batches 7] [--warmup 2] [--threads 2] [--device cpu]
                                    [--library-encoder | --no-kernels] [--compile encoder]
                                    [--strategy multi_step] [--scope per_sequence]
                                    [--order causal] [--windows 16] [--out results.jsonl]

Times training batches (dropout on, forward + backward + Adam step, the loss that of
``TitansForecaster``: ``titans_lightning.module.forecast_loss``) and evaluation batches
(eval mode, no outer gradient; the memory still learns) for context windows 16 and 32 (or
those ``--windows`` names), and prints the median of each; the last line is one JSON object with
two figures per window. ``--out``
appends the run to a JSON-lines file with what it ran on: commit, device, threads, seed, every
batch's time and the wall time.
``--library-encoder`` builds the same model with ``nn.TransformerEncoderLayer`` (the
straightforward implementation) for comparison; ``--no-kernels`` keeps the package's layer but
switches the CPU kernels off (``TITANS_LIGHTNING_KERNELS=0``): every operation on PyTorch.
``--strategy``, ``--scope`` and ``--order`` time another memory rule (built-in name, dotted
module or ``.py`` file), memory scope and MAC order (default: the benchmark's
``titans_default``, shared, reference order), ``--windows`` only some context windows (16 is
sinwave's and weather's, 32 sinwave-long's). Records made before these options existed lack
``strategy``, ``memory_scope`` and ``mac_order``: they timed the defaults.
``--compile encoder`` runs the encoder layers through ``torch.compile``, as
``--model.compile encoder`` does (``titans_lightning.module.compile_encoders``); each mode and
context window then compiles in its first batch, a warm-up batch unless ``--warmup 0`` (the
run's ``wall_s`` includes it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import typing

import torch
import torch.nn.functional as F

from titans_lightning import MACTitan, kernels
from titans_lightning import model as mac_model
from titans_lightning.kernels import build
from titans_lightning.module import COMPILE_TARGETS, compile_encoders, forecast_loss
from titans_lightning.results import git_commit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_batch(model: MACTitan, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
              train: bool) -> float:
    """Seconds of one training batch (forward, loss, backward, Adam step) or evaluation batch
    (no outer gradient; the memory still learns)."""
    _sync(batch.device)
    start = time.perf_counter()
    if train:
        preds, _ = model(batch)  # the batch is its own target: preds[:, t] forecasts t+1
        loss = forecast_loss(preds, batch, model.C - 1)  # scored as TitansForecaster does
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    else:
        with torch.no_grad():
            model(batch)
    _sync(batch.device)
    return time.perf_counter() - start


def time_batches(model: MACTitan, batch: torch.Tensor, train: bool, n: int,
                 warmup: int) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train(train)
    times = [one_batch(model, optimizer, batch, train) for _ in range(warmup + n)]
    return times[warmup:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--library-encoder", action="store_true",
                        help="use nn.TransformerEncoderLayer instead of the package's layer")
    parser.add_argument("--no-kernels", action="store_true",
                        help="switch the CPU kernels off: every operation on the PyTorch path")
    parser.add_argument("--compile", choices=COMPILE_TARGETS, default="none",
                        help="run these through torch.compile (as --model.compile)")
    parser.add_argument("--strategy", default="titans_default",
                        help="memory rule: a built-in name, dotted module or .py file "
                             "(default: %(default)s)")
    parser.add_argument("--scope", choices=("shared", "per_sequence"), default="shared",
                        help="memory scope (default: %(default)s)")
    parser.add_argument("--order", choices=("reference", "causal"), default="reference",
                        help="MAC order (default: %(default)s)")
    parser.add_argument("--windows", type=int, nargs="+", choices=(16, 32), default=[16, 32],
                        help="context windows to time, each once (default: 16 32)")
    parser.add_argument("--out", help="append the run, with its setting, to this JSON-lines file")
    args = parser.parse_args(argv)
    if len(set(args.windows)) != len(args.windows):
        parser.error(f"--windows names a context window twice ({' '.join(map(str, args.windows))}):"
                     " name each once, e.g. --windows 16 32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = start()
    if args.no_kernels:
        os.environ[build.SWITCH] = "0"
    if args.library_encoder:
        mac_model.EncoderLayer = lambda d, h, f, p: torch.nn.TransformerEncoderLayer(
            d, h, f, p, activation=F.silu, batch_first=True)
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.no_kernels:
        print(f"CPU kernels: {'on' if kernels.available() else build.failure() or 'off'}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = torch.sin(torch.linspace(0, 60, 500)).repeat(4, 1)[..., None].to(device)  # (4, 500, 1)
    result, every_batch = {}, {}
    for C in args.windows:
        model = build_model(args, C).to(device)
        compile_encoders(model, args.compile)
        for mode, train in (("train", True), ("eval", False)):
            times = time_batches(model, batch, train, args.batches, args.warmup)
            result[f"{mode}_s_per_batch_c{C}"] = round(statistics.median(times), 4)
            every_batch[f"{mode}_c{C}"] = [round(t, 4) for t in times]
            print(f"C={C} {mode}: median {statistics.median(times):.3f} s/batch "
                  f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} batches)", flush=True)
    if args.out:
        append_record(args, result, every_batch, device, started,
                      variant="library-encoder" if args.library_encoder
                      else "no-kernels" if args.no_kernels else "kernels", compile=args.compile,
                      strategy=args.strategy, memory_scope=args.scope, mac_order=args.order)
    print(json.dumps(result))


def build_model(args: argparse.Namespace, context_window: int) -> MACTitan:
    """The benchmark model (its defaults) with the timed rule, memory scope and MAC order."""
    return MACTitan(context_window=context_window, strategy=args.strategy,
                    memory_scope=args.scope, mac_order=args.order)


class Start(typing.NamedTuple):
    time: float  # time.perf_counter() when the measurement began
    commit: str | None  # the code it runs, taken then: the checkout may move on meanwhile


def start() -> Start:
    return Start(time.perf_counter(), git_commit())


def append_record(args: argparse.Namespace, result: dict, every_batch: dict,
                  device: torch.device, started: Start, **setting) -> None:
    """Append one timing run to ``args.out`` as a JSON line: the figures, every batch's time,
    the commit, device, threads, seed, batch counts, ``setting``, torch and the wall time."""
    run = {"result": result, "batch_seconds": every_batch, "commit": started.commit,
           "device": device_description(device), "threads": args.threads, "seed": 0,
           "batches": args.batches, "warmup": args.warmup, **setting,
           "torch": torch.__version__, "wall_s": round(time.perf_counter() - started.time, 1),
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds")}
    with open(args.out, "a") as out:
        out.write(json.dumps(run) + "\n")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            model = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"cpu: {model}"


if __name__ == "__main__":
    main()

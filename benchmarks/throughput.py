"""Seconds per batch of the benchmark MACTitan (batch 4, 500 steps, sinwave shapes).

    python benchmarks/throughput.py [--batches 7] [--warmup 2] [--threads 2] [--device cpu]
                                    [--library-encoder | --no-fused]

Times training batches (dropout on, forward + backward + Adam step) and evaluation batches
(eval mode, no outer gradient; the memory still learns) for context windows 16 and 32, and
prints the median of each; the last line is one JSON object with the four figures.
``--library-encoder`` builds the same model with ``nn.TransformerEncoderLayer`` (the
straightforward implementation) for comparison; ``--no-fused`` keeps the package's layer but
runs its feed-forward on the plain PyTorch path instead of the fused kernel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from titans_lightning import MACTitan, fused
from titans_lightning import model as mac_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batches(model: MACTitan, batch: torch.Tensor, train: bool, n: int, warmup: int) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train(train)
    times = []
    for i in range(warmup + n):
        _sync(batch.device)
        start = time.perf_counter()
        if train:
            preds, valid = model(batch)
            loss = torch.nn.functional.mse_loss(preds[:, valid][:, :-1], batch[:, valid][:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                model(batch)
        _sync(batch.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--library-encoder", action="store_true",
                        help="use nn.TransformerEncoderLayer instead of the package's layer")
    parser.add_argument("--no-fused", action="store_true",
                        help="feed-forward on the PyTorch path, not the fused CPU kernel")
    args = parser.parse_args()
    mac_model.EncoderLayer.fused = not args.no_fused
    if args.library_encoder:
        mac_model.EncoderLayer = lambda d, h, f, p: torch.nn.TransformerEncoderLayer(
            d, h, f, p, activation=F.silu, batch_first=True)
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.no_fused and not args.library_encoder:
        print(f"fused feed-forward kernel: {'on' if fused.library() else 'unavailable'}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = torch.sin(torch.linspace(0, 60, 500)).repeat(4, 1)[..., None].to(device)  # (4, 500, 1)
    result = {}
    for C in (16, 32):
        model = MACTitan(context_window=C).to(device)
        for mode, train in (("train", True), ("eval", False)):
            times = time_batches(model, batch, train, args.batches, args.warmup)
            result[f"{mode}_s_per_batch_c{C}"] = round(statistics.median(times), 4)
            print(f"C={C} {mode}: median {statistics.median(times):.3f} s/batch "
                  f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} batches)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

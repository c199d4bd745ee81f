"""Short screening runs for memory strategies (a plain training loop, no Lightning).

    python benchmarks/screen.py --name NAME --strategy meta_nlms --scope per_sequence \
        [--benchmark sinwave] [--epochs 6] [--ff 64] [--options '{"theta": 0.1}'] [--seed 0]

Same protocol as the benchmark (batch 4, Adam 1e-3, eval mode for validation and test, the
test split scored with the model and memory of the best validation epoch) but a narrower
feed-forward (``--ff``) and fewer epochs, to rank ideas cheaply. Writes
``benchmarks/screening/NAME.json`` after every epoch; an existing finished file is skipped.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from titans_lightning import MACTitan
from titans_lightning.results import git_commit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = {"sinwave": ("sinwave", 16), "weather": ("weather", 16), "sinwave_long": ("sinwave", 32)}


def load(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    arr = torch.from_numpy(np.load(DATA / name / f"{split}.npy")).float()
    inputs = arr if arr.shape[-1] == 1 else arr[..., :-1]
    return inputs, arr[..., -1:]


def describe_device() -> str:
    import platform
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def run_epoch(model, inputs, targets, C, optimizer=None, order=None) -> float:
    """Mean squared error over targets t+1 for t >= C-1 (training: also the outer step)."""
    train = optimizer is not None
    model.train(train)
    order = order if order is not None else torch.arange(len(inputs))
    total, count = 0.0, 0
    for i in range(0, len(order), 4):
        idx = order[i:i + 4]
        with torch.set_grad_enabled(train):
            preds, valid = model(inputs[idx])
            err = preds[:, C - 1:-1] - targets[idx][:, C:]
            loss = err.pow(2).mean()
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        total += float(err.detach().pow(2).sum())
        count += err.numel()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--strategy", default="titans_default")
    p.add_argument("--scope", default="shared")
    p.add_argument("--order", default="reference")
    p.add_argument("--benchmark", default="sinwave", choices=BENCHMARKS)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--ff", type=int, default=64)
    p.add_argument("--options", default="{}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    out = Path(__file__).resolve().parent / "screening" / f"{args.name}.json"
    if out.exists() and json.loads(out.read_text()).get("finished"):
        print(f"{out} exists, skipping")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_name, C = BENCHMARKS[args.benchmark]
    train_x, train_y = load(data_name, "train")
    val_x, val_y = load(data_name, "valid")
    test_x, test_y = load(data_name, "test")
    model = MACTitan(input_dim=train_x.shape[-1], context_window=C, dim_feedforward=args.ff,
                     strategy=args.strategy, strategy_options=json.loads(args.options),
                     memory_scope=args.scope, mac_order=args.order)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    record = {**vars(args), "commit": git_commit(), "device": describe_device(),
              "epochs_done": [], "finished": False}
    best = (float("inf"), None, None)
    start = time.time()
    for epoch in range(args.epochs):
        train_mse = run_epoch(model, train_x, train_y, C, optimizer, torch.randperm(len(train_x)))
        val_mse = run_epoch(model, val_x, val_y, C)
        test_mse = run_epoch(copy.deepcopy(model), test_x, test_y, C)  # memory as after val
        record["epochs_done"].append({"epoch": epoch, "train": train_mse, "val": val_mse,
                                      "test": test_mse, "wall_s": time.time() - start})
        if val_mse < best[0]:
            best = (val_mse, epoch, test_mse)
        record.update(best_val=best[0], best_epoch=best[1], test_at_best_val=best[2])
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print(f"{args.name} epoch {epoch}: train {train_mse:.4f} val {val_mse:.4f} "
              f"test {test_mse:.4f} ({time.time() - start:.0f} s)", flush=True)
    record["finished"] = True
    out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

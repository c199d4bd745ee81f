"""``titans-bench``: the benchmark table, strategies x benchmarks x seeds, resumable.

    titans-bench                                   # the three baselines, 3 benchmarks, 3 seeds
    titans-bench --strategies meta_nlms --scope per_sequence --jobs 2
    titans-bench --render                          # only rewrite benchmarks/RESULTS.md

Each run is ``titans fit`` with the benchmark's config on the published arrays (the full
protocol), in its own process and folder ``benchmarks/runs/<run>/``. When it finishes, its
record goes to ``benchmarks/results/<run>.json``; runs whose record exists are skipped, and a run
interrupted after a checkpoint resumes from its ``last.ckpt``. ``--jobs`` runs that many at once
(on a CPU, jobs x threads should not exceed the cores; on one GPU many jobs share the card).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
BENCHMARKS = {  # name -> (config, published arrays)
    "sinwave": ("configs/sinwave.yaml", "sinwave"),
    "weather": ("configs/weather.yaml", "weather"),
    "sinwave_long": ("configs/sinwave_long.yaml", "sinwave"),
}
BASELINES = ("titans_default", "adam_gated", "contrastive_ema")
PUBLISHED = {  # REFERENCE.md, test MSE
    "adam_gated": {"sinwave": 0.019, "weather": 0.052, "sinwave_long": 0.032},
    "contrastive_ema": {"sinwave": 0.018, "weather": 0.050, "sinwave_long": 0.033},
    "titans_default": {"sinwave": 0.019, "weather": 0.051, "sinwave_long": 0.032},
}
ORACLE = {"sinwave": 0.0135, "sinwave_long": 0.0133}


def run_name(benchmark: str, strategy: str, scope: str, protocol: str, seed: int) -> str:
    return f"{benchmark}__{strategy}__{scope}__{protocol}__seed{seed}"


def fit_command(args, benchmark: str, strategy: str, seed: int, run_dir: Path) -> list[str]:
    config, arrays = BENCHMARKS[benchmark]
    cmd = [sys.executable, "-m", "titans_lightning.cli", "fit", "--config", str(ROOT / config),
           f"--model.strategy={strategy}", f"--model.memory_scope={args.scope}",
           f"--model.eval_protocol={args.protocol}", f"--seed_everything={seed}",
           f"--data.init_args.data_dir={Path(args.data_root).resolve() / arrays}",
           f"--trainer.logger.init_args.save_dir={run_dir}",
           "--trainer.enable_progress_bar=false", f"--trainer.accelerator={args.accelerator}"]
    if args.protocol == "reference":
        cmd.append("--data.init_args.shuffle_eval=true")
    last = latest_checkpoint(run_dir)
    if last is not None:
        cmd.append(f"--ckpt_path={last}")
    return cmd + args.extra


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("*/version_*/checkpoints/last.ckpt"), key=os.path.getmtime)
    return found[-1] if found else None


def run_one(args, benchmark: str, strategy: str, seed: int) -> str:
    name = run_name(benchmark, strategy, args.scope, args.protocol, seed)
    out = args.out / "results" / f"{name}.json"
    if out.exists():
        return f"{name}: done already"
    run_dir = args.out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    spent = run_dir / "wall_s.txt"  # wall time of earlier, interrupted attempts
    before = float(spent.read_text()) if spent.exists() else 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    with open(run_dir / "log.txt", "a") as log:
        code = subprocess.call(fit_command(args, benchmark, strategy, seed, run_dir),
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    spent.write_text(str(before + time.time() - start))
    results = sorted(run_dir.glob("*/version_*/result.json"), key=os.path.getmtime)
    if code != 0 or not results:
        return f"{name}: FAILED (exit {code}), see {run_dir / 'log.txt'}"
    record = json.loads(results[-1].read_text())
    record.update(benchmark=benchmark, strategy=strategy, memory_scope=args.scope,
                  protocol=args.protocol, seed=seed, wall_s=round(before + time.time() - start, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True))
    return f"{name}: test MSE {record['test_mse']:.5f} (best epoch {record['best_epoch']})"


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)} seeds)"


def render(out: Path = BENCH) -> Path:
    """Write RESULTS.md from the result files and the screening runs under ``out``."""
    rows: dict[tuple, dict[str, list[float]]] = {}
    for r in load_results(out):
        key = (r["strategy"], r["memory_scope"], r["protocol"])
        rows.setdefault(key, {}).setdefault(r["benchmark"], []).append(r["test_mse"])
    names = list(BENCHMARKS)
    lines = ["# Benchmark results", "",
             "Test MSE at the best validation epoch, mean ± sample std over seeds, from the files "
             "in `benchmarks/results/` (one per run: config, commit, seed, device, wall time). "
             "Rendered by `titans-bench --render`; runs are made with `titans-bench`.", "",
             "## Our runs", "",
             "| strategy | memory | protocol | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for (strategy, scope, protocol), cells in sorted(rows.items()):
        lines.append(f"| {strategy} | {scope} | {protocol} | "
                     + " | ".join(cell(cells.get(b, [])) for b in names) + " |")
    if not rows:
        lines.append("| (no finished run yet) |  |  |" + " |" * len(names))
    lines += ["", "## Published (seed table, REFERENCE.md)", "",
              "| strategy | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for strategy, cells in PUBLISHED.items():
        lines.append(f"| {strategy} | " + " | ".join(f"{cells[b]:.3f}" for b in names) + " |")
    lines.append("| oracle (sine family) | 0.0135 | — | 0.0133 |")
    lines += ["", *screening_table(out)]
    notes = out / "research.md"  # what was tried and what it did, written by hand
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def screening_table(out: Path) -> list[str]:
    files = sorted((out / "screening").glob("*.json"))
    if not files:
        return []
    lines = ["## Screening runs (`benchmarks/screen.py`: narrow feed-forward, few epochs)", "",
             "Indicative only: one seed, a cheaper model; selection on validation.", "",
             "| run | benchmark | strategy | memory | options | ff | epochs | best val | "
             "test at best val |", "|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        r = json.loads(f.read_text())
        done = len(r["epochs_done"])
        lines.append(f"| {r['name']} | {r['benchmark']} | {r['strategy']} | {r['scope']} | "
                     f"`{r['options']}` | {r['ff']} | {done}/{r['epochs']} | "
                     f"{r['best_val']:.4f} | {r['test_at_best_val']:.4f} |")
    return lines


def threads_per_run(jobs: int, cores: int | None = None) -> int:
    """CPU threads for each of `jobs` concurrent runs: the cores shared out, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the benchmark table (resumable).")
    p.add_argument("--strategies", nargs="+", default=list(BASELINES))
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--scope", default="shared", choices=["shared", "per_sequence"])
    p.add_argument("--protocol", default="default", choices=["default", "reference"])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (OMP_NUM_THREADS; default: the cores / --jobs, "
                        "since more runs' busy-waiting threads than cores slow all of them)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", type=Path, default=BENCH,
                   help="folder of results/, runs/ and RESULTS.md (default: benchmarks/)")
    p.add_argument("--render", action="store_true", help="only rewrite RESULTS.md")
    p.add_argument("extra", nargs="*", help="more `titans fit` arguments, after --")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = threads_per_run(args.jobs)
    if not args.render:
        runs = [(b, s, seed) for seed in args.seeds for b in args.benchmarks
                for s in args.strategies]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for message in pool.map(lambda r: run_one(args, *r), runs):
                print(message, flush=True)
                render(args.out)
    print(f"wrote {render(args.out)}")


if __name__ == "__main__":
    main()

"""``titans-bench``: the benchmark table, strategies x benchmarks x seeds, resumable.

    titans-bench                                   # the three baselines, 3 benchmarks, 3 seeds
    titans-bench --strategies meta_nlms --scope per_sequence --order causal --jobs 2
    titans-bench --label ff64 --benchmarks sinwave --seeds 0 -- --model.dim_feedforward=64
    titans-bench --out benchmarks --render         # only rewrite benchmarks/RESULTS.md

Each run is ``titans fit`` with the benchmark's config on the published arrays, in its own
process and folder ``runs/<run>/``; it prints a line per epoch (epoch, val MSE, ETA), prefixed
with the run's name. When it finishes, its record goes to ``results/<run>.json`` (a full-protocol
run) and holds the run's ``result.json`` plus the exact ``titans fit`` arguments, every attempt
and the wall time of all of them. Runs whose record exists are skipped; a run interrupted after
a checkpoint resumes from its ``last.ckpt`` in the same folder.

Only full-protocol runs reach the table: the benchmark's config with nothing changed but the
strategy, its options, the memory scope, the MAC order, the evaluation protocol and the seed.
Extra ``titans fit`` arguments (after ``--``) make a screening run: they need a ``--label``, and
such runs live in ``runs/<label>/`` and ``screening/<label>/``, which the table never reads.

``--jobs`` runs that many at once (on a CPU, jobs x threads should not exceed the cores; on one
GPU many jobs share the card). The exit code is 1 when any run failed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
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
_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        print(message, flush=True)


def options_tag(options: dict[str, Any]) -> str:
    """``{"theta": 0.5}`` -> ``+theta0.5``: the options as part of a run's name (with a short
    hash of them where characters had to be dropped, so that names never collide)."""
    if not options:
        return ""
    text = "_".join(f"{k}{json.dumps(v)}" for k, v in sorted(options.items()))
    clean = re.sub(r"[^A-Za-z0-9._-]", "", text)
    if clean != text:
        clean += "-" + short_hash(json.dumps(options, sort_keys=True))
    return "+" + clean


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def strategy_tag(strategy: str) -> str:
    """A built-in name as it is; a file as its name and a hash of its path (no folders)."""
    if not strategy.endswith(".py") and "/" not in strategy:
        return strategy
    return f"{Path(strategy).stem}-{short_hash(str(Path(strategy).resolve()))}"


def run_name(benchmark: str, strategy: str, scope: str, order: str, protocol: str, seed: int,
             options: dict[str, Any] | None = None) -> str:
    return (f"{benchmark}__{strategy_tag(strategy)}{options_tag(options or {})}__{scope}__"
            f"{order}-order__{protocol}-protocol__seed{seed}")


def fit_arguments(args, benchmark: str, strategy: str, seed: int, run_dir: Path) -> list[str]:
    """The ``titans fit`` arguments of one run, without the checkpoint it may resume from."""
    config, arrays = BENCHMARKS[benchmark]
    argv = ["fit", "--config", str(ROOT / config),
            f"--model.strategy={strategy}", f"--model.memory_scope={args.scope}",
            f"--model.mac_order={args.order}", f"--model.eval_protocol={args.protocol}",
            f"--seed_everything={seed}",
            f"--data.init_args.data_dir={Path(args.data_root).resolve() / arrays}",
            f"--trainer.logger.init_args.save_dir={run_dir}",
            "--trainer.enable_progress_bar=false", f"--trainer.accelerator={args.accelerator}"]
    if args.options:
        argv.append(f"--model.strategy_options={json.dumps(args.options, sort_keys=True)}")
    if args.protocol == "reference":
        argv.append("--data.init_args.shuffle_eval=true")
    return argv + args.extra


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("*/version_*/checkpoints/last.ckpt"), key=os.path.getmtime)
    return found[-1] if found else None


def record_path(args, name: str) -> Path:
    if args.label:
        return args.out / "screening" / args.label / f"{name}.json"
    return args.out / "results" / f"{name}.json"


def run_one(args, benchmark: str, strategy: str, seed: int) -> str:
    """Run (or resume) one run; returns ``done``, ``skipped`` or ``failed``."""
    name = run_name(benchmark, strategy, args.scope, args.order, args.protocol, seed, args.options)
    out = record_path(args, name)
    if out.exists():
        say(f"{name}: done already ({out})")
        return "skipped"
    run_dir = args.out / "runs" / (args.label or "") / name
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = fit_arguments(args, benchmark, strategy, seed, run_dir)
    attempts_file = run_dir / "attempts.json"  # every attempt, also those that were cut off
    attempts = json.loads(attempts_file.read_text()) if attempts_file.exists() else []
    last = latest_checkpoint(run_dir)
    attempt = {"resumed_from": str(last) if last else None, "exit": None, "wall_s": 0.0}
    attempts.append(attempt)
    say(f"{name}: {'resuming from ' + str(last) if last else 'starting'}")
    command = [sys.executable, "-m", "titans_lightning.cli", *argv]
    if last is not None:
        command.append(f"--ckpt_path={last}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()

    def save_attempts() -> None:
        attempt["wall_s"] = round(time.time() - start, 1)
        attempts_file.write_text(json.dumps(attempts, indent=1))

    save_attempts()
    with open(run_dir / "log.txt", "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=env, cwd=ROOT, text=True, bufsize=1)
        for line in process.stdout:
            log.write(line)
            if line.startswith(("epoch ", "test MSE")):
                log.flush()
                save_attempts()  # so that a runner killed mid-run still counts this attempt
                say(f"{name}: {line.rstrip()}")
        attempt["exit"] = process.wait()
    save_attempts()
    results = sorted(run_dir.glob("*/version_*/result.json"), key=os.path.getmtime)
    result = json.loads(results[-1].read_text()) if results else None
    if attempt["exit"] != 0 or result is None or result.get("status") != "ok":
        why = f"exit {attempt['exit']}" if attempt["exit"] != 0 else \
            f"status {result.get('status') if result else 'missing'}"
        say(f"{name}: FAILED ({why}), see {run_dir / 'log.txt'}")
        return "failed"
    record = {**result, "benchmark": benchmark, "strategy": strategy,
              "strategy_options": args.options, "memory_scope": args.scope,
              "mac_order": args.order, "protocol": args.protocol, "seed": seed,
              "label": args.label, "fit_args": argv, "extra_args": args.extra,
              "threads": args.threads, "attempts": attempts,
              "fit_wall_s": result["wall_s"],
              "wall_s": round(sum(a["wall_s"] for a in attempts), 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True, allow_nan=False))
    say(f"{name}: test MSE {record['test_mse']:.5f} (best epoch {record['best_epoch']}, "
        f"{record['wall_s'] / 60:.0f} min) -> {out}")
    return "done"


def load_records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)} seeds)"


def strategy_label(record: dict) -> str:
    options = record.get("strategy_options") or {}
    text = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{record['strategy']} ({text})" if text else record["strategy"]


def render(out: Path) -> Path:
    """Write RESULTS.md from the full-protocol records and the screening records under ``out``."""
    rows: dict[tuple, dict[str, list[float]]] = {}
    for r in load_records(out / "results"):
        key = (strategy_label(r), r["memory_scope"], r.get("mac_order", "reference"),
               r["protocol"])
        rows.setdefault(key, {}).setdefault(r["benchmark"], []).append(r["test_mse"])
    names = list(BENCHMARKS)
    lines = ["# Benchmark results", "",
             "Test MSE at the best validation epoch, mean ± sample std over seeds, from the "
             "full-protocol records in `benchmarks/results/` (one per run: config, exact "
             "`titans fit` arguments, commit, seed, device, wall time of every attempt). "
             "Rendered by `titans-bench --render`; runs are made with `titans-bench`.", "",
             "## Our runs (full protocol)", "",
             "| strategy | memory | MAC order | protocol | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for (strategy, scope, order, protocol), cells in sorted(rows.items()):
        lines.append(f"| {strategy} | {scope} | {order} | {protocol} | "
                     + " | ".join(cell(cells.get(b, [])) for b in names) + " |")
    if not rows:
        lines.append("| (no finished run yet) |  |  |  |" + " |" * len(names))
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
    labels = sorted(p for p in (out / "screening").glob("*") if p.is_dir())
    records = [(label.name, r) for label in labels for r in load_records(label)]
    if not records:
        return []
    lines = ["## Screening runs (`titans-bench --label ...`, never part of the table above)", "",
             "Indicative only: one seed, the extra `titans fit` arguments shown; selection on "
             "validation.", "",
             "| label | benchmark | strategy | memory | MAC order | extra arguments | seed | "
             "best epoch | best val | test at best val | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in records:
        extra = " ".join(r["extra_args"])
        lines.append(
            f"| {label} | {r['benchmark']} | {strategy_label(r)} | {r['memory_scope']} | "
            f"{r['mac_order']} | `{extra}` | {r['seed']} | {r['best_epoch']} | "
            f"{number(r['val_mse'])} | {number(r['test_mse'])} | {r['wall_s'] / 60:.0f} min |")
    return lines


def threads_per_run(jobs: int, cores: int | None = None) -> int:
    """CPU threads for each of `jobs` concurrent runs: the cores shared out, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run the benchmark table (resumable); see the module docstring.")
    p.add_argument("--strategies", nargs="+", default=list(BASELINES),
                   help="strategy names or paths (default: the three published baselines)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS),
                   help="benchmarks to run (default: all three)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds (--seed_everything) to run (default: 0 1 2)")
    p.add_argument("--scope", default="shared", choices=["shared", "per_sequence"],
                   help="memory scope of every run")
    p.add_argument("--order", default="reference", choices=["reference", "causal"],
                   help="MAC order (--model.mac_order): reference (published) or causal")
    p.add_argument("--options", type=json.loads, default={},
                   help='strategy options as JSON, e.g. \'{"theta": 0.5}\' (part of the run name)')
    p.add_argument("--protocol", default="default", choices=["default", "reference"],
                   help="evaluation protocol (reference: the published quirks, fidelity only)")
    p.add_argument("--label", default=None,
                   help="screening label: required with extra fit arguments; such runs are kept "
                        "under screening/<label>/ and never reach the table")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (OMP_NUM_THREADS; default: the cores / --jobs, "
                        "since more runs' busy-waiting threads than cores slow all of them)")
    p.add_argument("--accelerator", default="auto",
                   help="--trainer.accelerator of every run (auto: a GPU where there is one)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                   help="folder with the published arrays (sinwave/, weather/)")
    p.add_argument("--out", type=Path, default=Path("titans-bench"),
                   help="folder of results/, screening/, runs/ and RESULTS.md (default: "
                        "./titans-bench; the repository's own table is --out benchmarks)")
    p.add_argument("--render", action="store_true", help="only rewrite RESULTS.md")
    p.add_argument("extra", nargs="*", help="more `titans fit` arguments, after --")
    args = p.parse_args(argv)
    if args.extra and not args.label:
        p.error("extra `titans fit` arguments change the protocol, so such runs are screening "
                f"runs: give them a --label (they go to {args.out / 'screening'}/LABEL/ and never "
                "reach the table)")
    if args.label is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.label):
        p.error(f"--label {args.label!r}: use letters, digits, '.', '_' and '-' only")
    if not isinstance(args.options, dict):
        p.error(f"--options must be a JSON object, got {args.options!r}")
    if args.threads is None:
        args.threads = threads_per_run(args.jobs)
    # each run's process works in the package's folder: paths must not depend on this one's
    args.out = args.out.resolve()
    args.strategies = [str(Path(s).resolve()) if s.endswith(".py") else s
                       for s in args.strategies]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.render:
        runs = [(b, s, seed) for seed in args.seeds for b in args.benchmarks
                for s in args.strategies]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            outcomes = list(pool.map(lambda r: run_one(args, *r), runs))
        counts = {k: outcomes.count(k) for k in ("done", "skipped", "failed")}
        say(f"{len(runs)} runs: {counts['done']} finished, {counts['skipped']} done before, "
            f"{counts['failed']} failed")
        say(f"wrote {render(args.out)}")
        if counts["failed"]:
            sys.exit(1)
        return
    say(f"wrote {render(args.out)}")


if __name__ == "__main__":
    main()

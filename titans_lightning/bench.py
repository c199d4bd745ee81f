"""titans-bench: the benchmark table, strategies x benchmarks x seeds, resumable.

    titans-bench                                   # the three baselines, 3 benchmarks, 3 seeds
    titans-bench --strategies meta_nlms --scope per_sequence --order causal --jobs 2
    titans-bench --label ff64 --benchmarks sinwave --seeds 0 -- --model.dim_feedforward=64
    titans-bench --out benchmarks --render         # only rewrite benchmarks/RESULTS.md

Each run is `titans fit` with the benchmark's config on the published arrays, in its own
process, working in its own folder runs/RUN/; it prints a line per epoch (epoch, val MSE, ETA),
prefixed with the run's name. When it finishes, its record goes to results/RUN.json (a
full-protocol run) and holds the run's result.json (whose config is the whole resolved one, the
package's base config included) plus the exact `titans fit` arguments, every attempt and the
wall time of all of them. Runs whose record exists are skipped; a run interrupted after a
checkpoint resumes from its last.ckpt in the same folder. A run whose record or folder was made
with other extra arguments fails instead: give those another --label. Afterwards (or
with --render alone) the records are tabled: RESULTS.md, with mean +- sample std and the count
of seeds per cell, and results.csv and screening.csv, one row per record.

Only full-protocol runs reach the main table: the benchmark's config with nothing changed but
the strategy, its options, the memory scope, the MAC order, the evaluation protocol and the
seed. Extra `titans fit` arguments (after --) make a screening run: they need a --label, and
such runs live in runs/LABEL/ and screening/LABEL/, tabled apart, per label. They cannot set
what the runner sets (RUNNER_OWNS): the error names the option that does.

Every file the runner writes is written whole or not at all. One that is not valid JSON (cut
short by an older writer, or edited) fails its run alone, with its path.

The configs and the arrays are found without assuming where this package sits (see --configs
and --data-root). --jobs runs that many at once (on a CPU, jobs x threads should not exceed the
cores; on one GPU many jobs share the card). The exit code is 1 when any run failed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .bench_table import render
from .files import UnreadableFile, read_json, write_text_atomic

BENCHMARKS = {  # name -> (config file in the configs folder, published arrays' folder)
    "sinwave": ("sinwave.yaml", "sinwave"),
    "weather": ("weather.yaml", "weather"),
    "sinwave_long": ("sinwave_long.yaml", "sinwave"),
}
ARRAYS = ("train.npy", "valid.npy", "test.npy")
BASELINES = ("titans_default", "adam_gated", "contrastive_ema")
RUNNER_OWNS = {  # `titans fit` arguments the runner sets itself -> what chooses them instead
    "--config": "--benchmarks (and --configs for the folder)",
    "--model": "--strategies, --options, --scope, --order and --protocol (give any other model "
               "argument on its own, --model.NAME=VALUE)",
    "--model.strategy": "--strategies", "--model.strategy_options": "--options",
    "--model.memory_scope": "--scope", "--model.mac_order": "--order",
    "--model.eval_protocol": "--protocol", "--seed_everything": "--seeds",
    "--data": "--benchmarks", "--data.class_path": "--benchmarks",
    "--data.data_dir": "--data-root", "--data.shuffle_eval": "--protocol",
    "--trainer.accelerator": "--accelerator",
    "--trainer.logger": "the runner (each run logs to runs/[LABEL/]RUN/)",
    "--trainer.enable_progress_bar": "the runner (it prints a line per epoch instead)",
    "--ckpt_path": "the runner (a run resumes from the last.ckpt in its folder)",
}
_print_lock = threading.Lock()


def runner_owned(argument: str) -> str | None:
    """What chooses the setting ``argument`` (``--KEY=VALUE`` or a bare ``--KEY``) sets, where
    the runner sets it itself; None for any other argument. ``init_args`` levels are ignored, so
    ``--data.init_args.data_dir`` and ``--data.data_dir`` are one setting."""
    if not argument.startswith("--"):
        return None  # the value of the argument before it
    key = argument.split("=", 1)[0].replace(".init_args", "")
    for owned, instead in RUNNER_OWNS.items():  # a whole group (--model, --data) as itself
        if key == owned or (key.startswith(owned + ".") and owned not in ("--model", "--data")):
            return instead
    return None


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
    argv = ["fit", "--config", str(args.configs / config),
            f"--model.strategy={strategy}", f"--model.memory_scope={args.scope}",
            f"--model.mac_order={args.order}", f"--model.eval_protocol={args.protocol}",
            f"--seed_everything={seed}",
            f"--data.init_args.data_dir={args.data_root / arrays}",
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
    run_dir = args.out / "runs" / (args.label or "") / name
    extra_file = run_dir / "extra_args.json"  # what the name does not say
    done = out.exists()
    if done:
        made_with = read_json(out).get("extra_args", [])
    else:  # a folder from before extra_args.json was kept is not checked
        made_with = read_json(extra_file) if extra_file.exists() else args.extra
    if made_with != args.extra:
        say(f"{name}: FAILED (made with other extra arguments): {out if done else run_dir} "
            f"was made with {made_with}, not {args.extra}; give these runs another --label")
        return "failed"
    if done:
        say(f"{name}: done already ({out})")
        return "skipped"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(extra_file, json.dumps(args.extra))
    argv = fit_arguments(args, benchmark, strategy, seed, run_dir)
    attempts_file = run_dir / "attempts.json"  # every attempt, also those that were cut off
    attempts = read_json(attempts_file) if attempts_file.exists() else []
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
        write_text_atomic(attempts_file, json.dumps(attempts, indent=1))

    save_attempts()
    with open(run_dir / "log.txt", "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=env, cwd=run_dir, text=True, bufsize=1)
        try:
            for line in process.stdout:
                log.write(line)
                if line.startswith(("epoch ", "test MSE")):
                    log.flush()
                    save_attempts()  # so that a runner killed mid-run still counts this attempt
                    say(f"{name}: {line.rstrip()}")
        except BaseException:  # an error here (a full disk) fails the run: none runs unwatched
            process.kill()
            raise
        attempt["exit"] = process.wait()
    save_attempts()
    results = sorted(run_dir.glob("*/version_*/result.json"), key=os.path.getmtime)
    result = read_json(results[-1]) if results else None
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
    write_text_atomic(out, json.dumps(record, indent=1, sort_keys=True, allow_nan=False))
    say(f"{name}: test MSE {record['test_mse']:.5f} (best epoch {record['best_epoch']}, "
        f"{record['wall_s'] / 60:.0f} min) -> {out}")
    return "done"


def run_or_fail(args, benchmark: str, strategy: str, seed: int) -> str:
    """``run_one``, where an error fails this run alone, with its cause, and the others go on."""
    try:
        return run_one(args, benchmark, strategy, seed)
    except Exception as error:  # noqa: BLE001 - said, counted, and the exit code is 1
        name = run_name(benchmark, strategy, args.scope, args.order, args.protocol, seed,
                        args.options)
        why = str(error) if isinstance(error, UnreadableFile) else \
            f"{type(error).__name__}: {error}"
        say(f"{name}: FAILED ({why})")
        return "failed"


def editable_source() -> Path | None:
    """The source folder of an editable install of this package, from the install's own record
    (``direct_url.json``, PEP 610), or None for a regular install or no install. (Build metadata
    without that record, such as a checkout's ``*.egg-info``, is passed over.)"""
    for dist in importlib.metadata.distributions(name="titans-lightning"):
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        url = urllib.parse.urlparse(info.get("url", ""))
        if info.get("dir_info", {}).get("editable") and url.scheme == "file":
            return Path(urllib.request.url2pathname(url.path))
    return None


def config_folders() -> list[Path]:
    """Where the benchmark configs are looked for, in order: the source folder of an editable
    install, then ``./configs``."""
    source = editable_source()
    return ([source / "configs"] if source is not None else []) + [Path.cwd() / "configs"]


def data_folders() -> list[Path]:
    """Where the published arrays are looked for, in order: ``./data`` and ``../shared/data``
    (the configs' own convention) from the working directory, then the same two beside the
    source folder of an editable install."""
    bases = [Path.cwd()]
    source = editable_source()
    if source is not None:
        bases.append(source)
    return [folder for base in bases for folder in (base / "data", base.parent / "shared" / "data")]


def has_configs(folder: Path, benchmarks: list[str]) -> bool:
    return all((folder / BENCHMARKS[b][0]).is_file() for b in benchmarks)


def has_arrays(folder: Path, benchmarks: list[str]) -> bool:
    return all((folder / BENCHMARKS[b][1] / name).is_file() for b in benchmarks for name in ARRAYS)


def locate(given: Path | None, candidates: list[Path], holds, benchmarks: list[str],
           what: str, option: str) -> Path:
    """``given`` if it holds what the benchmarks need, else the first candidate that does; the
    error names every folder tried and the option that chooses one."""
    tried = [f.resolve() for f in ([given] if given is not None else candidates)]
    for folder in tried:
        if holds(folder, benchmarks):
            return folder
    raise FileNotFoundError(
        f"no folder with {what} for {', '.join(benchmarks)}; tried "
        f"{', '.join(str(f) for f in tried)}. Pass {option} DIR")


def threads_per_run(jobs: int, cores: int | None = None) -> int:
    """CPU threads for each of `jobs` concurrent runs: the cores shared out, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="titans-bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=list(BASELINES), metavar="STRATEGY",
                   help="built-in strategy names, dotted modules or .py files (default: the "
                        "three published baselines)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS),
                   metavar="BENCHMARK",
                   help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="seeds (--seed_everything) to run (default: 0 1 2)")
    p.add_argument("--scope", default="shared", choices=["shared", "per_sequence"],
                   help="memory scope (--model.memory_scope) of every run (default: shared)")
    p.add_argument("--order", default="reference", choices=["reference", "causal"],
                   help="MAC order (--model.mac_order): reference (published, the default) or "
                        "causal")
    p.add_argument("--options", type=json.loads, default={}, metavar="JSON",
                   help='strategy options (--model.strategy_options) as a JSON object, e.g. '
                        '\'{"theta": 0.5}\'; part of the run name (default: none)')
    p.add_argument("--protocol", default="default", choices=["default", "reference"],
                   help="evaluation protocol (--model.eval_protocol; default: default); "
                        "reference: the published quirks, for fidelity only")
    p.add_argument("--label", default=None,
                   help="screening label, required with extra fit arguments: such runs are kept "
                        "under runs/LABEL/ and screening/LABEL/ and never reach the main table")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (OMP_NUM_THREADS; default: the cores / --jobs, "
                        "since more runs' busy-waiting threads than cores slow all of them)")
    p.add_argument("--accelerator", default="auto",
                   help="--trainer.accelerator of every run (default: auto, a GPU where there "
                        "is one)")
    p.add_argument("--configs", type=Path, default=None, metavar="DIR",
                   help="folder of the benchmark configs (sinwave.yaml, weather.yaml, "
                        "sinwave_long.yaml); default: those of an editable install's source "
                        "folder, then ./configs")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="folder of the published arrays (sinwave/ and weather/, each with "
                        "train.npy, valid.npy and test.npy); default: the first of ./data, "
                        "../shared/data, and the same two beside an editable install's source "
                        "folder that has them")
    p.add_argument("--out", type=Path, default=Path("titans-bench"), metavar="DIR",
                   help="folder of runs/, results/, screening/, results.csv, screening.csv and "
                        "RESULTS.md (default: ./titans-bench, so that nothing tracked is "
                        "overwritten; the repository's own table is --out benchmarks)")
    p.add_argument("--render", action="store_true",
                   help="run nothing: only rewrite RESULTS.md, results.csv and screening.csv "
                        "from the records in --out")
    p.add_argument("extra", nargs="*", metavar="-- FIT_ARGUMENT",
                   help="more `titans fit` arguments, after --: a screening run (needs --label); "
                        "give paths in them as absolute paths, since each run works in its own "
                        "folder runs/[LABEL/]RUN/")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    # what the runner sets is refused first: a --label would not make it allowed
    owned = [f"{a} (set by {by})" for a in args.extra if (by := runner_owned(a))]
    if owned:
        p.error(f"titans-bench sets these `titans fit` arguments itself, so a run's name and "
                f"record always say what it ran: {'; '.join(owned)}")
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
    # each run's process works in its own folder: no path may depend on this one's
    args.out = args.out.resolve()
    args.strategies = [str(Path(s).resolve()) if s.endswith(".py") else s
                       for s in args.strategies]
    if not args.render:  # rendering needs neither configs nor data
        try:
            args.configs = locate(args.configs, config_folders(), has_configs, args.benchmarks,
                                  "the benchmark configs", "--configs")
            args.data_root = locate(args.data_root, data_folders(), has_arrays, args.benchmarks,
                                    "the published arrays", "--data-root")
        except FileNotFoundError as missing:
            p.error(str(missing))
    return args


def written(table: Path) -> str:
    return f"{table} (and results.csv, screening.csv beside it)"


def render_or_exit(out: Path) -> None:
    """Table the records in ``out``; a record that cannot be tabled exits 1, saying which."""
    try:
        say(f"wrote {written(render(out))}")
    except ValueError as refused:
        print(f"titans-bench: error: RESULTS.md not written: {refused}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.render:
        runs = [(b, s, seed) for seed in args.seeds for b in args.benchmarks
                for s in args.strategies]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            outcomes = list(pool.map(lambda r: run_or_fail(args, *r), runs))
        counts = {k: outcomes.count(k) for k in ("done", "skipped", "failed")}
        say(f"{len(runs)} runs: {counts['done']} finished, {counts['skipped']} done before, "
            f"{counts['failed']} failed")
        render_or_exit(args.out)
        if counts["failed"]:
            sys.exit(1)
        return
    render_or_exit(args.out)


if __name__ == "__main__":
    main()

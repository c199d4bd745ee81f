"""The benchmark records as data: a pandas frame, ``results.csv``, ``screening.csv`` and
``RESULTS.md``.

    frame = records_frame(sorted(Path("benchmarks/results").glob("*.json")))
    frame.groupby(["strategy", "scope", "order", "benchmark"]).test_mse.agg(["mean", "std"])

``render(out)`` reads ``out/results/*.json`` (full-protocol records) and
``out/screening/<label>/*.json`` (screening records), and writes, in ``out``:

    results.csv     one row per full-protocol record, the columns of ``COLUMNS``
    screening.csv   the same for the screening records (their ``label`` and ``extra_args`` set)
    RESULTS.md      our runs (mean ± sample std and count over seeds, per cell), the published
                    table, one table per screening label, then ``out/research.md`` if present

The two kinds never share a table or a file: a screening run changed the protocol.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .files import read_json, write_text_atomic

# the reference implementation's seed table, test MSE; its benchmarks, in this order, are the
# table's columns
PUBLISHED = {
    "adam_gated": {"sinwave": 0.019, "weather": 0.052, "sinwave_long": 0.032},
    "contrastive_ema": {"sinwave": 0.018, "weather": 0.050, "sinwave_long": 0.033},
    "titans_default": {"sinwave": 0.019, "weather": 0.051, "sinwave_long": 0.032},
}
ORACLE = {"sinwave": 0.0135, "sinwave_long": 0.0133}  # the sine family's own noise floor
COLUMNS = ("record", "benchmark", "strategy", "options", "scope", "order", "protocol", "seed",
           "status", "val_mse", "test_mse", "test_mae", "best_epoch", "wall_s", "fit_wall_s",
           "attempts", "threads", "device", "commit", "label", "extra_args")
GROUP = ["strategy_label", "scope", "order", "protocol"]  # what tells one table row from another


def record_row(path: Path) -> dict:
    """One record file as a row of ``COLUMNS`` (records older than a field get its default)."""
    r = read_json(path)
    options = r.get("strategy_options") or {}
    return {
        "record": path.stem, "benchmark": r["benchmark"], "strategy": r["strategy"],
        "options": json.dumps(options, sort_keys=True),  # "{}" for none: never a missing key
        "scope": r["memory_scope"], "order": r.get("mac_order", "reference"),
        "protocol": r["protocol"], "seed": r["seed"], "status": r.get("status", "ok"),
        "val_mse": r.get("val_mse"), "test_mse": r.get("test_mse"),
        "test_mae": r.get("test_mae"), "best_epoch": r.get("best_epoch"),
        "wall_s": r.get("wall_s"), "fit_wall_s": r.get("fit_wall_s"),
        "attempts": len(r.get("attempts") or []), "threads": r.get("threads"),
        "device": r.get("device"), "commit": r.get("commit"), "label": r.get("label") or "",
        "extra_args": " ".join(r.get("extra_args") or []),
    }


def records_frame(paths: list[Path]) -> pd.DataFrame:
    """The records at ``paths``, one row each, in ``COLUMNS`` (an empty frame has them too)."""
    frame = pd.DataFrame([record_row(p) for p in paths], columns=list(COLUMNS))
    return frame.astype({"seed": "Int64", "best_epoch": "Int64", "attempts": "Int64",
                         "threads": "Int64"})


def strategy_label(strategy: str, options: str) -> str:
    """``meta_nlms`` with options ``{"theta": 0.5}`` -> ``meta_nlms (theta=0.5)``."""
    text = ", ".join(f"{k}={v}" for k, v in sorted(json.loads(options).items()))
    if not text:
        return strategy
    return f"{strategy} ({text})"


def check_full_protocol(frame: pd.DataFrame, folder: Path) -> None:
    """Refuse records that must not reach the main table: screening runs, unfinished runs."""
    screening = frame[(frame.label != "") | (frame.extra_args != "")]
    if len(screening):
        raise ValueError(
            f"{folder}: {', '.join(screening.record)} changed the protocol (a --label or extra "
            "`titans fit` arguments): screening records belong in screening/<label>/")
    failed = frame[(frame.status != "ok") | frame.test_mse.isna()]
    if len(failed):
        raise ValueError(f"{folder}: {', '.join(failed.record)} did not finish with a test MSE "
                         "(status not ok); only finished runs may be averaged into the table")


def cell(mean: float, std: float, count: int, unit: str = "seed") -> str:
    """``0.0250 ± 0.0071 (2 seeds)``; one value has no spread: ``0.0184 (1 seed)``."""
    if count == 0:
        return "—"
    if count == 1:
        return f"{mean:.4f} (1 {unit})"
    return f"{mean:.4f} ± {std:.4f} ({count} {unit}s)"


def markdown_table(frame: pd.DataFrame) -> list[str]:
    header = [str(c) for c in frame.columns]
    rows = [[str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def benchmark_order(frame: pd.DataFrame) -> list[str]:
    """The published benchmarks, then any other benchmark the records have."""
    published = list(next(iter(PUBLISHED.values())))
    return published + sorted(set(frame.benchmark) - set(published))


def labelled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(strategy_label=[strategy_label(s, o)
                                        for s, o in zip(frame.strategy, frame.options)])


def our_runs_table(frame: pd.DataFrame) -> list[str]:
    """Test MSE per (strategy, options, scope, order, protocol) row and benchmark column."""
    names = benchmark_order(frame)
    header = ["strategy", "memory", "MAC order", "protocol", *names]
    if frame.empty:
        return markdown_table(pd.DataFrame([["(no finished run yet)"] + [""] * (len(header) - 1)],
                                           columns=header))
    stats = labelled(frame).groupby([*GROUP, "benchmark"]).test_mse.agg(["mean", "std", "count"])
    rows = []
    for key, by_benchmark in stats.groupby(level=GROUP, sort=True):
        by_benchmark = by_benchmark.droplevel(GROUP)
        rows.append([*key, *(cell(by_benchmark.at[b, "mean"], by_benchmark.at[b, "std"],
                                  int(by_benchmark.at[b, "count"]))
                             if b in by_benchmark.index else "—" for b in names)])
    return markdown_table(pd.DataFrame(rows, columns=header))


def published_table(names: list[str]) -> list[str]:
    rows = [[s, *(f"{cells[b]:.3f}" if b in cells else "—" for b in names)]
            for s, cells in PUBLISHED.items()]
    rows.append(["oracle (sine family)",
                 *(f"{ORACLE[b]:.4f}" if b in ORACLE else "—" for b in names)])
    return markdown_table(pd.DataFrame(rows, columns=["strategy", *names]))


def spread(values: pd.Series) -> str:
    """Mean ± sample std of a screening cell's seeds (the seeds column gives the count)."""
    if len(values) == 1:
        return f"{values.iloc[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std():.4f}"


def epoch_range(epochs: pd.Series) -> str:
    """``17``, or ``16-18`` where the seeds' best epochs differ."""
    epochs = epochs.dropna()
    if epochs.empty:
        return "—"
    low, high = int(epochs.min()), int(epochs.max())
    return str(low) if low == high else f"{low}-{high}"


def screening_label_table(frame: pd.DataFrame) -> list[str]:
    """One label's runs: a row per (benchmark, strategy, scope, order, protocol, extra args)."""
    rows = []
    keys = ["benchmark", *GROUP, "extra_args"]
    for key, runs in labelled(frame).groupby(keys, sort=True):
        rows.append([*key, " ".join(str(s) for s in sorted(runs.seed)),
                     epoch_range(runs.best_epoch), spread(runs.val_mse), spread(runs.test_mse),
                     f"{runs.wall_s.mean() / 60:.0f} min"])
    table = pd.DataFrame(rows, columns=["benchmark", "strategy", "memory", "MAC order",
                                        "protocol", "extra arguments", "seeds", "best epoch",
                                        "best val", "test at best val", "wall"])
    table["extra arguments"] = [f"`{e}`" if e else "" for e in table["extra arguments"]]
    lines = []
    if table["extra arguments"].nunique() == 1:  # one setting: say it once, above the table
        lines = [f"Extra `titans fit` arguments: {table['extra arguments'].iloc[0] or 'none'}",
                 ""]
        table = table.drop(columns="extra arguments")
    return lines + markdown_table(table)


def screening_section(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return []
    lines = ["## Screening runs (`titans-bench --label ...`, never part of the table above)", "",
             "Indicative only: each label changed the protocol (its extra `titans fit` "
             "arguments), and selection is on validation. Best val and test at best val are the "
             "mean ± sample std over the seeds listed; wall is the mean per run. The records, "
             "one row each, are in `screening.csv`."]
    for label, runs in frame.groupby("label", sort=True):
        lines += ["", f"### `{label}`", "", *screening_label_table(runs)]
    return lines


def read_folder(folder: Path) -> pd.DataFrame:
    return records_frame(sorted(folder.glob("*.json")))


def read_screening(folder: Path) -> pd.DataFrame:
    """Every ``folder/<label>/*.json``, its ``label`` the folder's name (as the runner files it)."""
    paths = [(p, label.name) for label in sorted(folder.glob("*")) if label.is_dir()
             for p in sorted(label.glob("*.json"))]
    return records_frame([p for p, _ in paths]).assign(label=[label for _, label in paths])


def render(out: Path) -> Path:
    """Write ``results.csv``, ``screening.csv`` and ``RESULTS.md`` in ``out``; return the last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = read_folder(out / "results")
    check_full_protocol(full, out / "results")
    screening = read_screening(out / "screening")
    write_text_atomic(out / "results.csv", full.to_csv(index=False))
    write_text_atomic(out / "screening.csv", screening.to_csv(index=False))
    lines = ["# Benchmark results", "",
             "Test MSE at the best validation epoch: mean ± sample std and the number of seeds "
             "per cell, from the full-protocol records in `results/` (one per run: config, exact "
             "`titans fit` arguments, commit, seed, device, wall time of every attempt). The "
             "same records, one row each, are in `results.csv` (`pandas.read_csv`). Rendered by "
             "`titans-bench --out DIR --render`, DIR being this folder; runs are made with "
             "`titans-bench`.", "",
             "## Our runs (full protocol)", "", *our_runs_table(full), "",
             "## Published (the reference implementation's seed table)", "",
             *published_table(benchmark_order(full)), "", *screening_section(screening)]
    notes = out / "research.md"  # what was tried and what it did, written by hand
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    path = out / "RESULTS.md"
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path

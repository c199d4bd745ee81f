"""Names of new run folders: ``version_3-titans_default-shared-reference-seed0``.

TensorBoard lists runs by their folder names, so a new run's folder says what ran: its number
first (so that folders sort by it), then the strategy (a file's stem, a module's last name), the
memory scope, the MAC order and the seed. The number is one more than the highest among the
folders already beside it, ``version_N`` (older runs) and ``version_N-...`` alike. Lightning's
own numbering reads only ``version_N``, so the CLI sets the whole name as the loggers' version.

Under DDP, Lightning's subprocess launcher starts ranks 1.. by running the same command again,
and each would look for a free number itself, before or after rank 0 made its folder. So rank 0
leaves its choice in the environment of the processes it launches, and they take it (a later run
of the same process chooses afresh; any other process ignores it). Processes that a cluster
starts itself (torchrun, SLURM) choose alone: give them ``--trainer.logger.init_args.version``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .contract import is_path

RUN_FOLDER = re.compile(r"version_(\d+)(?:-.*)?")
LAUNCHED_VERSION = "TITANS_RUN_VERSION"  # "<pid of rank 0> <version>", for the ranks it launches
NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_.+]")  # "-" separates the parts of a name


def new_run_version(root: str | Path, strategy: str, memory_scope: str, mac_order: str,
                    seed: int | None) -> str:
    """The folder name (logger version) of a new run in ``root`` (the loggers' save_dir/name);
    on a rank that rank 0 launched, rank 0's choice."""
    launched = version_from_rank_zero()
    if launched is not None:
        return launched
    version = (f"version_{next_run_number(Path(root))}-"
               f"{run_description(strategy, memory_scope, mac_order, seed)}")
    os.environ[LAUNCHED_VERSION] = f"{os.getpid()} {version}"
    return version


def next_run_number(root: Path) -> int:
    """One more than the highest N of the ``version_N`` and ``version_N-...`` folders in
    ``root``; 0 when there are none."""
    if not root.is_dir():
        return 0
    numbers = [int(match.group(1)) for path in root.iterdir()
               if path.is_dir() and (match := RUN_FOLDER.fullmatch(path.name))]
    return max(numbers, default=-1) + 1


def run_description(strategy: str, memory_scope: str, mac_order: str, seed: int | None) -> str:
    """``titans_default-shared-reference-seed0``: what tells the runs of one benchmark apart."""
    parts = [strategy_label(strategy), memory_scope, mac_order,
             "unseeded" if seed is None else f"seed{seed}"]
    return "-".join(NOT_IN_A_NAME.sub("_", str(part)) for part in parts)


def strategy_label(strategy: str) -> str:
    """A built-in's name; a file's stem (``rules/my_rule.py``: ``my_rule``); a dotted module's
    last name (``mypackage.rules.nlms``: ``nlms``). Folders are never part of it."""
    if is_path(strategy):
        return Path(strategy).stem
    return strategy.rsplit(".", 1)[-1]


def version_from_rank_zero() -> str | None:
    """The version rank 0 chose, in a process that rank 0 launched as another rank (its parent,
    with ``LOCAL_RANK`` > 0); None in any other process, including rank 0 itself."""
    if launched_rank() == 0:
        return None
    pid, _, version = os.environ.get(LAUNCHED_VERSION, "").partition(" ")
    return version if version and pid == str(os.getppid()) else None


def launched_rank() -> int:
    """``LOCAL_RANK`` as Lightning's launcher sets it for the processes it starts; 0 unset."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0

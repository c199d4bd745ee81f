"""A callback for the DDP run-folder test: another run's folder appears while the ranks start,
and each rank writes down the run folder it logs to."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from titans_lightning.run_names import launched_rank


class CompetingRunAndRankFolders(L.Callback):
    """On rank 0, when built (after the CLI named the run's folder, before it launches the other
    ranks), make the folder ``root/version_5-another_run``: a rank that looked for a free number
    itself would now take 6. At setup, every rank writes its logger's folder to
    ``record/rank<R>.txt``."""

    def __init__(self, root: str, record: str):
        if launched_rank() == 0:
            (Path(root) / "version_5-another_run").mkdir(parents=True, exist_ok=True)
        self.record = Path(record)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.record.mkdir(parents=True, exist_ok=True)
        (self.record / f"rank{trainer.global_rank}.txt").write_text(trainer.logger.log_dir)

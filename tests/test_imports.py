"""What importing a part of the package loads: the datamodules never load the memory."""
from __future__ import annotations

import subprocess
import sys


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_the_datamodules_load_neither_the_memory_nor_the_model():
    loaded = loaded_after("import datamodules")
    assert "titans_lightning.sampling" in loaded
    assert not {"titans_lightning.memory", "titans_lightning.model", "titans_lightning.module",
                "titans_lightning.strategy"} & loaded


def test_the_package_exports_its_names_on_first_use():
    import titans_lightning
    from titans_lightning.memory import NeuralMemory

    assert titans_lightning.NeuralMemory is NeuralMemory
    assert set(titans_lightning.__all__) <= set(dir(titans_lightning))
    loaded = loaded_after("import titans_lightning")
    assert "titans_lightning.memory" not in loaded

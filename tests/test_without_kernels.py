"""The PyTorch path, with the CPU kernels switched off (TITANS_LIGHTNING_KERNELS=0): the memory,
model, strategy and training tests run again in a child process, so both paths are tested on
every run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = ["tests/test_memory.py", "tests/test_memory_contract.py", "tests/test_model.py",
         "tests/strategies", "tests/test_module.py", "tests/test_recorded_run.py"]


@pytest.mark.skipif(os.environ.get("TITANS_LIGHTNING_KERNELS") == "0",
                    reason="this whole run is already without the kernels")
def test_the_core_tests_pass_without_the_kernels():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TITANS_LIGHTNING_KERNELS": "0", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]

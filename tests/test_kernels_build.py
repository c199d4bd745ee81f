"""In CI the CPU kernels must build: without this, a broken build would skip every kernel test
(tests/test_fused.py skips where no kernel library exists) and CI would stay green."""
import os

import pytest

from titans_lightning import fused


@pytest.mark.skipif(not os.environ.get("CI"), reason="on a developer's machine without a "
                    "compiler the kernels may be absent; CI (the CI variable set) needs them")
@pytest.mark.skipif(os.environ.get("TITANS_LIGHTNING_FUSED") == "0",
                    reason="kernels switched off on purpose")
def test_the_kernels_build():
    fused.library.cache_clear()
    assert fused.library() is not None

"""In CI the CPU kernels must build: without this, a broken build would skip every kernel test
(tests/test_kernels.py skips where no kernel library exists) and CI would stay green."""
import os

import pytest

from titans_lightning.kernels import build


@pytest.mark.skipif(not os.environ.get("CI"), reason="on a developer's machine without a "
                    "compiler the kernels may be absent; CI (the CI variable set) needs them")
@pytest.mark.skipif(build.switched_off(), reason="kernels switched off on purpose")
def test_the_kernels_build():
    build._load.cache_clear()
    assert build.library() is not None, build.failure()

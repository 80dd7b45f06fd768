import os

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _fresh_compile_cache(tmp_path_factory):
    """Every test session compiles for real into its own cache directory."""
    if "IREEOPT_TEST_KEEP_CACHE" not in os.environ:
        os.environ["IREEOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("ireeopt-cache"))
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

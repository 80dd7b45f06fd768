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


def _device_works(driver):
    """Whether IREE can open a ``driver`` device here (checked in a subprocess: a missing
    Vulkan ICD or CUDA driver must not take the test process down)."""
    import subprocess
    import sys
    code = f"import iree.runtime as rt; rt.get_device({driver!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


HAS_VULKAN = _device_works("vulkan")
HAS_CUDA = _device_works("cuda")
if os.environ.get("IREEOPT_REQUIRE_VULKAN") and not HAS_VULKAN:   # set by .ci/run, which installs lavapipe
    raise RuntimeError("IREEOPT_REQUIRE_VULKAN is set but IREE finds no Vulkan device: is mesa-vulkan-drivers "
                       "installed?")
needs_vulkan = pytest.mark.skipif(not HAS_VULKAN, reason="no Vulkan device (install mesa-vulkan-drivers for lavapipe)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine (compile-only here)")

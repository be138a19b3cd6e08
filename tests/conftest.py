"""Test set-up: 8 emulated CPU devices, configured before JAX is imported
anywhere, which is why it lives here (pytest imports conftest.py before any
test module).

No persistent compilation cache: shared by the two workers and the train.py
processes they start, jaxlib 0.10.2's CPU executables crashed a worker in 2
of 3 full runs (moco_jax/launch/compilation_cache.py); train.py's `auto`
leaves it off on a CPU too. tests/test_compilation_cache.py turns it on in
processes of its own. A later full run without the cache crashed a worker
too, in the same test (test_remat.py's SyncBN case, which passes alone and
now runs in a process of its own), so the cache may not be the cause; it
stays off here until a full run with it shows otherwise.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # also where a developer's shell sets one

import jax  # noqa: E402

assert jax.device_count() == 8, "XLA_FLAGS was set too late: JAX saw %d devices" % jax.device_count()


import pytest  # noqa: E402

# The helpers next to this file, also for a worker xdist starts in place of one that crashed.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from image_files import make_corrupt_folder, make_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder of 20 solid-colour images in two classes (tests/image_files.py)."""
    return make_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    """8 good images, a truncated JPEG and a PNG of garbage (tests/image_files.py)."""
    return make_corrupt_folder(tmp_path_factory)

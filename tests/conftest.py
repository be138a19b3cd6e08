"""Test set-up: 8 emulated CPU devices and a persistent compilation cache.

Both must be configured before JAX is imported anywhere, which is why they
live here (pytest imports conftest.py before any test module).
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling the tiny ResNets dominates the suite's run time; a persistent cache
# makes every run after the first several times faster.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

assert jax.device_count() == 8, "XLA_FLAGS was set too late: JAX saw %d devices" % jax.device_count()


import pytest  # noqa: E402

from image_files import make_corrupt_folder, make_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder of 20 solid-colour images in two classes (tests/image_files.py)."""
    return make_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    """8 good images, a truncated JPEG and a PNG of garbage (tests/image_files.py)."""
    return make_corrupt_folder(tmp_path_factory)

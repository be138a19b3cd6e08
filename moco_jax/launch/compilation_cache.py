"""The persistent compilation cache, on by default on a GPU or TPU for every
command (train.py, knn_eval, linear_eval): XLA's compiled programs are kept on disk,
so a relaunch on the same machine (a preempted job's restart, the next run
of a sweep with the same shapes) reads its step, kNN and embedding functions
back instead of compiling them again (52 to 82 s on a CPU for ViT-B and
ResNet-50 MoCo v3, about 30 s on an H200: BENCHMARKS.md).

  --compilation_cache=auto   (default) $JAX_COMPILATION_CACHE_DIR if set; else, on
                             a GPU or TPU, $XDG_CACHE_HOME/moco_jax/xla
                             (~/.cache/moco_jax/xla), and on a CPU no cache
  --compilation_cache=DIR    that folder (e.g. on a fast local disk)
  --compilation_cache=off    no cache

JAX looks a program up by a hash of the program, the compile options, the
backend and the JAX/jaxlib versions, so a stale entry is never used; only
compilations over a second are stored (JAX's threshold). The cache is
trusted code: keep it in a folder only you can write.

Why `auto` leaves a CPU without it: with jaxlib 0.10.2, CPU executables
crashed the process in 2 of this project's last 3 full test-suite runs, where
two pytest workers and the train.py processes they start shared one cache
folder (a segmentation fault inside `executable.serialize()` writing an
entry, once inside `deserialize_executable` reading one; the cause is not
known, and a later run without any cache crashed in the same test, so the
cache may only have been where the crash showed). Name a folder to have it
on a CPU anyway.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
from absl import flags, logging

ENV = "JAX_COMPILATION_CACHE_DIR"
OFF = "off"

HELP = ("Where compiled programs are kept between launches (a relaunch then does not recompile): 'auto' = "
        f"${ENV} if set, else ~/.cache/moco_jax/xla on a GPU or TPU and none on a CPU; a folder; or '{OFF}'.")


def define_flag() -> flags.FlagHolder:
    """--compilation_cache, for a program to define with its other flags."""
    return flags.DEFINE_string("compilation_cache", "auto", HELP)


def default_dir() -> str:
    """$XDG_CACHE_HOME/moco_jax/xla, or ~/.cache/moco_jax/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moco_jax", "xla")


def resolve(setting: str, platform: str) -> Optional[str]:
    """The folder `setting` names ('auto', a folder, or 'off' / '' -> None)
    on a `platform` ('cpu', 'gpu', 'tpu': jax.default_backend())."""
    if setting in (OFF, ""):
        return None
    if setting == "auto":
        return os.environ.get(ENV) or (None if platform == "cpu" else default_dir())
    return os.path.abspath(os.path.expanduser(setting))


def enable(setting: str) -> Optional[str]:
    """Turn the cache on in `setting`'s folder (`resolve`; the value of
    --compilation_cache) before anything compiles, or off; returns the folder
    (None: off). A folder that cannot be created leaves the cache off, with a
    warning."""
    folder = resolve(setting, jax.default_backend())  # after jax.distributed.initialize, like every caller
    if folder is not None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            logging.warning("no compilation cache (%s: %s); every launch compiles again", folder, e)
            folder = None
    jax.config.update("jax_enable_compilation_cache", folder is not None)
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
        logging.debug("compilation cache: %s", folder)  # not INFO: a bad input's error stays one line
    return folder

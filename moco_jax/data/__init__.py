"""Datasets for pretraining and evaluation: one `Source` per kind of data.

    source = data.open_source(config)          # config.dataset and its data fields
    source.num_train_examples
    source.train_batches(global_batch=..., seed=..., start_step=...)   # this process's share
    source.train_batches(..., labels=True)     # (the same batches, their labels): an online probe
    # Labelled images, streamed: each process decodes only its share.
    source.num_classes(); source.num_labelled(split, max_images, seed)
    source.labelled_train_batches(global_batch=..., seed=..., crop_size=..., start_step=...)  # (images, labels)
    source.eval_batches(split=spec.eval_split, size=..., crop_fraction=..., global_batch=...)
                                               # (images, labels, valid), num_eval_steps(M, global_batch) steps
    source.labelled_arrays(size=...)           # un-augmented train / eval images, whole, in host memory

Sources (`sources/`, named by what they read) say what is read; the host
pipelines (`pipelines/`, named by what runs them: grain, tf.data) decode
and crop it. A new kind of dataset is one new module in `sources/` with an
`open_source(spec)` function returning a `Source` (see `source.py`), plus
one line in `SOURCES`; a new pipeline is a module in `pipelines/` with a
`two_crop_batches`, a `labelled_batches`, an `eval_batches` and a
`center_crops`. The sources are imported only when
their dataset is opened, and the pipelines only when images are decoded, so
a run on the in-memory arrays imports neither.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

from moco_jax.data.source import FIELDS, ArrayDataset, Source, SourceConfig, num_eval_steps, steps_per_epoch

__all__ = ["ArrayDataset", "FIELDS", "Source", "SourceConfig", "SOURCES", "check", "num_eval_steps", "open_source",
           "steps_per_epoch", "workdir_index"]

# config.dataset -> the module of moco_jax.data that opens it.
SOURCES = {
    "digits": "sources.arrays",  # scikit-learn's digits, in memory
    "cifar10_arrays": "sources.arrays",  # CIFAR-10 from the shared mosaics, in memory
    "image_folder": "sources.image_folder",  # data_dir/<split>/<class>/*.jpg|png, grain or tf.data
}
# Any other name is a tensorflow-datasets name (optionally written 'tfds:NAME').
DEFAULT_SOURCE = "sources.tfds"


def source_module(dataset: str) -> str:
    """The module of moco_jax.data that opens `dataset`."""
    return SOURCES.get(dataset, DEFAULT_SOURCE)


def open_source(config, index_fallback: str = "", process_index: Optional[int] = None) -> Source:
    """The source of `config.dataset`, opened once (an image folder is listed,
    or its index file read; a TFDS builder checked to be prepared).

    Args:
      config: an experiment config declaring the data fields (see
        `SourceConfig`), or a `SourceConfig`.
      index_fallback: where a source that lists files (image_folder) keeps its
        index when data_dir is not writable and no index_dir is set: the
        trainer's workdir/data_index ('' = a folder private to the process).
      process_index: this process, for those sources (process 0 lists, the
        others read its index); None: jax's, when jax is imported, else 0.
    """
    spec = config if isinstance(config, SourceConfig) else SourceConfig.from_config(config)
    module = importlib.import_module(f"moco_jax.data.{source_module(spec.dataset)}")
    if getattr(module, "LISTS_FILES", False):
        return module.open_source(spec, index_fallback=index_fallback, process_index=process_index)
    return module.open_source(spec)


def workdir_index(workdir: str) -> str:
    """The folder of a run's workdir where an image folder's index is kept when
    data_dir is not writable and no index_dir is set ('' without a workdir)."""
    return os.path.join(workdir, "data_index") if workdir else ""


def check(config) -> None:
    """The checks `config.dataset`'s source makes of a config before it is
    opened (its `check(config)`, if it has one: the in-memory arrays check
    that the crop fits their images)."""
    module = importlib.import_module(f"moco_jax.data.{source_module(config.dataset)}")
    if hasattr(module, "check"):
        module.check(config)

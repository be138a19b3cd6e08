"""Features of a labelled split, extracted once on every device of every
process and kept on disk, one shard per process, read back memory-mapped
(the features-mode linear probe's input).

    <folder>/manifest.json                what they are the features of, and their layout
    <folder>/features-<p>-of-<P>.npy      float32 (rows, D): process p's rows, step after step
    <folder>/labels-<p>-of-<P>.npy        int32 (rows,)
    <folder>/valid-<p>-of-<P>.npy         bool (rows,): False for padding and skipped images

Position i of the split (the order of `Source.eval_batches`) lies in step
s = i // G of the extraction (G images per step over all processes), in the
share of process p = (i % G) // L (L = G / P per process), at row
s * L + i % L of p's files (`Layout.locate`). Every process writes its own
files (nothing is gathered); process 0 writes the manifest last, after all
of them, so a manifest names complete shards. A relaunch (any process, any
host that sees the folder) reuses them when the manifest matches: the same
encoder (a digest of its variables), data, view and layout. The shards of
all processes are opened read-only with `np.load(mmap_mode="r")`, so reading
rows costs page cache, never a copy of the split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Iterable

import jax
import numpy as np
from absl import logging

from moco_jax.core import sharding
from moco_jax.io import storage

MANIFEST = "manifest.json"
FORMAT = 1  # the layout of the files; another value is never reused


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the positions of a split are laid out over the processes' files."""

    num_examples: int  # positions 0 .. num_examples-1 (before padding)
    global_batch: int  # images per extraction step, over all processes
    process_count: int
    num_steps: int

    @property
    def local(self) -> int:
        return self.global_batch // self.process_count

    @property
    def rows(self) -> int:
        """Rows in each process's files."""
        return self.num_steps * self.local

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int (K,) positions -> (process (K,), row in its files (K,))."""
        positions = np.asarray(positions, np.int64)
        step, within = np.divmod(positions, self.global_batch)
        process, offset = np.divmod(within, self.local)
        return process, step * self.local + offset


def _name(kind: str, process: int, count: int) -> str:
    return f"{kind}-{process}-of-{count}.npy"


class FeatureShards:
    """The cached features of one split, every process's shard memory-mapped."""

    def __init__(self, folder: str, layout: Layout):
        self.folder, self.layout = folder, layout
        count = layout.process_count
        load = lambda kind, p: np.load(os.path.join(folder, _name(kind, p, count)), mmap_mode="r")  # noqa: E731
        self.features = [load("features", p) for p in range(count)]
        self.labels = [load("labels", p) for p in range(count)]
        self.valid = [load("valid", p) for p in range(count)]

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1])

    def valid_positions(self) -> np.ndarray:
        """int64 (M,): the positions whose image was embedded, in order."""
        valid = np.stack([np.asarray(v).reshape(self.layout.num_steps, -1) for v in self.valid], axis=1)
        return np.flatnonzero(valid.reshape(-1)[:self.layout.num_examples])

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 (K, D) features, int32 (K,) labels) of `positions`, in
        their order, read from whichever process's file holds each."""
        process, row = self.layout.locate(positions)
        features = np.empty((len(row), self.dim), np.float32)
        labels = np.empty(len(row), np.int32)
        for p in np.unique(process):
            mine = process == p
            order = np.argsort(row[mine])  # ascending reads from the memory map
            chosen = np.flatnonzero(mine)[order]
            features[chosen] = self.features[p][row[mine][order]]
            labels[chosen] = self.labels[p][row[mine][order]]
        return features, labels

    def own(self, process_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Process `process_index`'s (features, labels, valid) rows (memory-mapped)."""
        return self.features[process_index], self.labels[process_index], self.valid[process_index]


def read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cached(folder: str, settings: dict, layout: Layout,
           extract: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> FeatureShards:
    """The features of `settings` in `folder`: reused when its manifest
    matches `settings` and `layout`, else extracted now by every process
    from `extract()` (this process's (features (L, D), labels (L,), valid
    (L,)) of each of the layout's steps) and written. All processes agree on
    which (every one calls this)."""
    expected = {"format": FORMAT, "settings": settings, "layout": dataclasses.asdict(layout)}
    manifest = read_manifest(folder)
    reusable = manifest is not None and {k: manifest.get(k) for k in expected} == expected
    if not sharding.any_process(not reusable):
        logging.info("features in %s: reused (%d images, written %s)", folder, layout.num_examples,
                     manifest.get("written", "?"))
        return FeatureShards(folder, layout)
    os.makedirs(folder, exist_ok=True)
    if jax.process_index() == 0 and os.path.exists(os.path.join(folder, MANIFEST)):
        os.remove(os.path.join(folder, MANIFEST))  # stale: the shards below are rewritten
    _write_shards(folder, layout, extract())
    sharding.any_process(False)  # every process's shards are complete before the manifest names them
    if jax.process_index() == 0:
        record = {**expected, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        storage.write_file(os.path.join(folder, MANIFEST), json.dumps(record, indent=1).encode())
    sharding.any_process(False)
    logging.info("features in %s: extracted and written (%d images)", folder, layout.num_examples)
    return FeatureShards(folder, layout)


def _write_shards(folder: str, layout: Layout, steps: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """This process's files, step by step into memory-mapped .npy files
    written under temporary names and renamed when complete."""
    p, count, rows = jax.process_index(), layout.process_count, layout.rows
    paths = {kind: os.path.join(folder, _name(kind, p, count)) for kind in ("features", "labels", "valid")}
    tmp = {kind: f"{path}.{os.getpid()}.tmp.npy" for kind, path in paths.items()}
    outputs = None
    done = 0
    for features, labels, valid in steps:
        if outputs is None:
            outputs = {
                "features": np.lib.format.open_memmap(tmp["features"], "w+", np.float32, (rows, features.shape[1])),
                "labels": np.lib.format.open_memmap(tmp["labels"], "w+", np.int32, (rows,)),
                "valid": np.lib.format.open_memmap(tmp["valid"], "w+", np.bool_, (rows,)),
            }
        n = len(labels)
        outputs["features"][done:done + n] = features
        outputs["labels"][done:done + n] = labels
        outputs["valid"][done:done + n] = valid
        done += n
    if outputs is None or done != rows:
        raise RuntimeError(f"feature extraction wrote {done} rows of this process's {rows}")
    for kind, array in outputs.items():
        array.flush()
        os.replace(tmp[kind], paths[kind])

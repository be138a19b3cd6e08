"""Where training metrics go: TensorBoard (clu), JSON lines, the console.

Only process 0 writes files. `metrics.jsonl` in the workdir is the
machine-readable record (one JSON object per logged step; `moco_jax.plot`
and `moco_jax.sweep` read it); TensorBoard event files are written through
clu's writers when TensorFlow is installed (clu's TensorBoard writer uses
tf.summary) and skipped with one warning where it is not, e.g. on GPU hosts
that only have JAX.
"""

from __future__ import annotations

import json
import logging as logging_lib
import os
from typing import Any, Mapping

import jax
from absl import logging

JSONL_NAME = "metrics.jsonl"
FINAL_NAME = "final_metrics.json"


class _LibraryInfoFilter(logging_lib.Filter):
    """Drops INFO records logged from inside orbax and clu (every save and
    writer set-up logs several long lines), keeping their warnings."""

    _PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}clu{os.sep}")

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return record.levelno >= logging_lib.WARNING or not any(p in record.pathname for p in self._PATHS)


def quiet_library_logs() -> None:
    """Keep the console to our own progress and metric lines."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())


def _tensorboard_writer(workdir: str):
    try:
        from clu import metric_writers  # noqa: PLC0415 - imports TensorFlow
    except ImportError as e:
        logging.warning("TensorBoard event files disabled (%s); metrics still go to %s", e, JSONL_NAME)
        return None
    return metric_writers.create_default_writer(workdir, asynchronous=True)


class MetricWriter:
    """Scalars per step to TensorBoard, `metrics.jsonl` and the absl log."""

    def __init__(self, workdir: str | None):
        self._is_writer = bool(workdir) and jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        if self._is_writer:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a")
            self._tensorboard = _tensorboard_writer(workdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if jax.process_index() == 0:
            logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
            self._jsonl.flush()
        if self._tensorboard:
            self._tensorboard.write_scalars(int(step), dict(scalars))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tensorboard:
            self._tensorboard.flush()
            self._tensorboard.close()


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
    """Every record of `metrics.jsonl`. A resumed run appends; where a step was
    logged twice (a crash after logging, before the next checkpoint) the later
    values win; records of one step (training and kNN metrics) are merged, so
    the result is one record per step, in step order."""
    records: dict[int, dict[str, Any]] = {}
    path = os.path.join(workdir, JSONL_NAME)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                records.setdefault(int(record["step"]), {}).update(record)
    return [records[s] for s in sorted(records)]


def write_final(workdir: str | None, final: Mapping[str, Any]) -> None:
    """`final_metrics.json`: the run's end result, for sweeps and scripts."""
    if workdir and jax.process_index() == 0:
        with open(os.path.join(workdir, FINAL_NAME), "w") as f:
            json.dump(dict(final), f, indent=2, sort_keys=True)

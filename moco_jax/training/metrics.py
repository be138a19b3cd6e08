"""Where training metrics go: JSON lines, TensorBoard, optionally Weights &
Biases, and the console.

Only process 0 writes. `metrics.jsonl` in the workdir is the machine-readable
record (one JSON object per logged step; `moco_jax.plot` and `moco_jax.sweep`
read it). TensorBoard event files go into the workdir through tensorboardX,
which needs no TensorFlow (`tensorboard --logdir W`; a resumed run adds one
file, which TensorBoard merges). With `config.wandb_project` set, the same
scalars go to a W&B run whose id is kept in `W/wandb_run_id`, so a resumed
run continues that run; `wandb` is imported only then.
"""

from __future__ import annotations

import json
import logging as logging_lib
import math
import os
import re
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from moco_jax.core import config as config_lib

JSONL_NAME = "metrics.jsonl"
FINAL_NAME = "final_metrics.json"
WANDB_ID_NAME = "wandb_run_id"


class _LibraryInfoFilter(logging_lib.Filter):
    """Drops INFO records logged from inside orbax (every save logs several
    long lines), keeping its warnings."""

    _PATHS = (f"{os.sep}orbax{os.sep}",)

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return record.levelno >= logging_lib.WARNING or not any(p in record.pathname for p in self._PATHS)


def quiet_library_logs() -> None:
    """Keep the console to our own progress and metric lines."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())


def _tensorboard_writer(workdir: str):
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 with a workdir needs it
    except ImportError as e:
        logging.warning("TensorBoard event files disabled (%s); metrics still go to %s", e, JSONL_NAME)
        return None
    # The default file name has a 1 s resolution and tensorboardX opens it with
    # "wb": a relaunch within the same second would clobber the previous file.
    return SummaryWriter(logdir=workdir, flush_secs=30, filename_suffix=f".{time.time_ns()}")


def _wandb_run_id(workdir: str, new_id) -> str:
    """The W&B run id of `workdir`: the saved one, or `new_id()` saved now, so
    that every relaunch of the workdir logs into the same W&B run."""
    path = os.path.join(workdir, WANDB_ID_NAME)
    if os.path.exists(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = new_id()
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)  # never a half-written id for the next launch
    return run_id


def wandb_run(workdir: str | None, config):
    """The W&B run of `config.wandb_project` (None where it is '' or absent);
    raises ConfigError when wandb is not installed."""
    project = config.get("wandb_project", "") if config is not None else ""
    if not project:
        return None
    try:
        import wandb  # noqa: PLC0415 - optional dependency, imported only when used
    except ImportError:
        raise config_lib.wandb_missing(project) from None
    resume = dict(id=_wandb_run_id(workdir, wandb.util.generate_id), resume="allow") if workdir else {}
    return wandb.init(project=project, entity=config.get("wandb_entity", "") or None,
                      name=config.get("wandb_name", "") or None, dir=workdir or None,
                      config=config_lib.flatten_dotted(config.to_dict()), **resume)


class MetricWriter:
    """Scalars per step to `metrics.jsonl`, TensorBoard, W&B and the absl log."""

    def __init__(self, workdir: str | None, config=None):
        self._is_writer = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not self._is_writer:
            return
        if workdir:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a")
            self._tensorboard = _tensorboard_writer(workdir)
        self._wandb = wandb_run(workdir, config)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._is_writer:
            return
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        values = {k: float(v) for k, v in scalars.items()}
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
            self._jsonl.flush()
        if self._tensorboard:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, int(step))
        if self._wandb:
            self._wandb.log(values, step=int(step))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tensorboard:
            self._tensorboard.close()  # flushes
        if self._wandb:
            self._wandb.finish()


def weight_norms(params: Mapping[str, Any]) -> dict[str, float]:
    """`weight_norm/<group>`: the L2 norm of all kernels (convolution and
    linear weights; no BN, no biases) of each group of layers: the backbone's
    top-level modules with the block index dropped (ResNet: `backbone/conv1`,
    `backbone/layer1` .. `layer4`; ViT: `backbone/patch_embed`,
    `backbone/blocks`), and each head (`head`, `predictor`).

    Under BN, SGD's effective step on a kernel w is about lr / |w|^2, so these
    norms (logged with the kNN monitor) show how fast each part still learns."""
    sums: dict[str, float] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(key, "key", key)) for key in path]
        if names[-1] != "kernel":
            continue
        group = f"backbone/{re.sub(r'_[0-9]+$', '', names[1])}" if names[0] == "backbone" else names[0]
        sums[group] = sums.get(group, 0.0) + float(np.sum(np.square(np.asarray(leaf, np.float64))))
    return {f"weight_norm/{group}": math.sqrt(total) for group, total in sums.items()}


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

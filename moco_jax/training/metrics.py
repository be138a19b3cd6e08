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

import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from moco_jax.core import config as config_lib
from moco_jax.core.config import STRING
from moco_jax.core.errors import ConfigError
from moco_jax.io import storage

JSONL_NAME = "metrics.jsonl"
FINAL_NAME = "final_metrics.json"
WANDB_ID_NAME = "wandb_run_id"


# Scalars written to the files but left off the console line: per-group
# weight norms, the throughput's other spellings and the slow-moving schedule.
CONSOLE_OMITS = ("weight_norm/", "images_per_sec_per_device", "step_time_ms", "momentum", "epoch")


def console_line(step: int, scalars: Mapping[str, float], progress: str = "") -> str:
    """The console's line for a logged step, e.g. `step 20/660: loss=5.225,
    top1=0.068 (eta 0:31)`; '' when every scalar is one the console omits."""
    shown = [f"{k}={v:.4g}" for k, v in scalars.items() if not k.startswith(CONSOLE_OMITS)]
    if not shown:
        return ""
    head, _, tail = progress.partition(" ")
    return f"step {step}{head}: {', '.join(shown)}{' ' + tail if tail else ''}"


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
    storage.write_file(path, (run_id + "\n").encode())  # never a half-written id for the next launch
    return run_id


# The W&B fields of a pretraining config.
FIELDS = {"wandb_project": STRING, "wandb_entity": STRING, "wandb_name": STRING}


def wandb_missing(project: str) -> ConfigError:
    """The error for a W&B project set where the wandb package is missing."""
    return ConfigError(f"wandb_project={project!r} needs the wandb package: `pip install wandb` "
                       "(or --config.wandb_project='')")


def check_wandb(config) -> None:
    """wandb must be importable where config.wandb_project is set: checked on
    every process before the data and model are built, not when the first
    metrics are written (find_spec does not import it)."""
    if config.wandb_project and importlib.util.find_spec("wandb") is None:
        raise wandb_missing(config.wandb_project)


def wandb_run(workdir: str | None, config):
    """The W&B run of `config.wandb_project` (None where it is '', or the
    config has no W&B fields: the linear probe's); raises ConfigError when
    wandb is not installed."""
    project = config.wandb_project if config is not None and "wandb_project" in config else ""
    if not project:
        return None
    try:
        import wandb  # noqa: PLC0415 - optional dependency, imported only when used
    except ImportError:
        raise wandb_missing(project) from None
    resume = dict(id=_wandb_run_id(workdir, wandb.util.generate_id), resume="allow") if workdir else {}
    return wandb.init(project=project, entity=config.wandb_entity or None, name=config.wandb_name or None,
                      dir=workdir or None,
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
            path = os.path.join(workdir, JSONL_NAME)
            if os.path.exists(path):
                _repair_torn_tail(path)
            self._jsonl = open(path, "a")
            self._tensorboard = _tensorboard_writer(workdir)
        self._wandb = wandb_run(workdir, config)

    def write(self, step: int, scalars: Mapping[str, float], progress: str = "") -> None:
        """All `scalars` to the files; the main ones to the console, with
        `progress` ("/660 (eta 0:31)": of the total and the time left)."""
        if not self._is_writer:
            return
        line = console_line(step, scalars, progress)
        if line:
            logging.info("%s", line)
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


def _decodes(line: str | bytes) -> bool:
    """Whether `line` is one whole JSON value."""
    try:
        json.loads(line)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        return False
    return True


def _torn_tail_start(f) -> int | None:
    """Where the last line of the binary file `f` starts if no newline ends
    it (a write cut short); None if `f` is empty or ends with a newline."""
    pos = f.seek(0, os.SEEK_END)
    if pos == 0:
        return None
    f.seek(pos - 1)
    if f.read(1) == b"\n":
        return None
    while pos > 0:
        start = max(0, pos - 4096)
        f.seek(start)
        newline = f.read(pos - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0


def _repair_torn_tail(path: str) -> None:
    """End `path` with a newline before appending to it: an unterminated last
    line that is a whole record gets its newline; a torn one (a run killed
    mid-write) is cut off, so the next record starts on a line of its own."""
    with open(path, "rb+") as f:
        start = _torn_tail_start(f)
        if start is None:
            return
        f.seek(start)
        tail = f.read()
        if _decodes(tail):
            f.write(b"\n")
            return
        f.truncate(start)
    logging.warning("%s: dropped its torn last line (%d bytes, a write cut short) before appending", path, len(tail))


def _parse_lines(path: str, lines: list[str]) -> list[dict[str, Any]]:
    """The JSON records of `lines` (of `path`). An undecodable line is skipped
    with a one-line warning: the last one (a run killed mid-write) or one
    elsewhere (a torn line later runs appended to). Raises ValueError where
    several lines and none is JSON (not a metrics log)."""
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records, bad = [], []
    for n, line in numbered:
        try:
            records.append(json.loads(line))
        except ValueError:  # json.JSONDecodeError
            bad.append(n)
    if len(bad) > 1 and not records:
        raise ValueError(f"no line of {path} is JSON")
    for n in bad:
        if n == numbered[-1][0]:
            logging.warning("%s: skipped its torn last line %d (a write cut short)", path, n)
        else:
            logging.warning("%s: skipped line %d, which is not JSON (a torn record)", path, n)
    return records


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
    """Every record of `metrics.jsonl`. A resumed run appends; where a step was
    logged twice (a crash after logging, before the next checkpoint) the later
    values win; records of one step (training and kNN metrics) are merged, so
    the result is one record per step, in step order. Torn lines (a run killed
    mid-write) are skipped with a warning each; raises ValueError if no line
    of several is JSON (not a metrics log)."""
    path = os.path.join(workdir, JSONL_NAME)
    with open(path, errors="replace") as f:
        lines = f.readlines()
    records: dict[int, dict[str, Any]] = {}
    for record in _parse_lines(path, lines):
        records.setdefault(int(record["step"]), {}).update(record)
    return [records[s] for s in sorted(records)]


def write_json_atomic(path: str, obj: Any) -> None:
    """`obj` as indented JSON in `path`, replaced atomically (`storage.write_atomic`)."""
    storage.write_atomic(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True), mode="w")


def read_final(workdir: str) -> dict[str, Any] | None:
    """The `final_metrics.json` of `workdir`, or None if there is none (or it
    cannot be read: it is written atomically, so that means absent)."""
    try:
        with open(os.path.join(workdir, FINAL_NAME)) as f:
            final = json.load(f)
    except (OSError, ValueError):
        return None
    return final if isinstance(final, dict) else None


def write_final(workdir: str | None, final: Mapping[str, Any]) -> None:
    """`final_metrics.json`: the run's end result, for sweeps and scripts;
    written atomically, so that it exists only whole."""
    if workdir and jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, FINAL_NAME), dict(final))


KNN_RANDOM_NAME = "knn_random.json"  # in the workdir: the random-init kNN, measured once per run


def read_knn_random(workdir: str, settings: Mapping[str, Any]) -> dict[str, float] | None:
    """The random-init kNN accuracies an earlier launch of the run in
    `workdir` stored, if it measured them with the same `settings` (the
    dataset, the crop and the kNN fields); else None."""
    try:
        with open(os.path.join(workdir, KNN_RANDOM_NAME)) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("settings") != json.loads(json.dumps(dict(settings))):
        return None
    return stored.get("knn_random")


def write_knn_random(workdir: str | None, settings: Mapping[str, Any], accuracies: Mapping[str, float]) -> None:
    """Store the random-init kNN accuracies (process 0, atomically), so that
    a relaunch of the run reads them instead of evaluating again."""
    if workdir and jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, KNN_RANDOM_NAME),
                          {"settings": dict(settings), "knn_random": dict(accuracies)})

"""Hyper-parameter sweeps over a config file's `get_sweep()`.

A config file may define, next to `get_config()`, a function returning the
points of a sweep as field overrides (dotted names for nested fields):

    def get_sweep():
        return [{"learning_rate": 0.03}, {"learning_rate": 0.06, "model.width": 8}]

    python -m moco_jax.sweep --config configs/sweep_example.py --workdir /tmp/sweep
    python -m moco_jax.sweep --config configs/sweep_example.py --workdir /tmp/sweep --dry_run

(the command-line program is `moco_jax/sweep.py`; this module does the work).

Each point trains in its own sub-workdir `<workdir>/<point name>` (the name
is derived from the overrides, so it is the same on every run) as a separate
`python train.py ... --config.<field>=<value>` process: a crash or an
out-of-memory point does not take the sweep down. Its output goes to
`<point>/train.log`. Points run one after another; `--dry_run` prints the
commands instead, one per line, for a cluster scheduler.

After every point, `<workdir>/sweep_results.csv` and `sweep_results.md`
tabulate the final metrics of all points (from each point's
`final_metrics.json`) with a status: `ok`, `failed (exit N)` with the log's
path, or `not run`. A point whose `final_metrics.json` exists is finished
and skipped when the sweep is run again (an empty or cut-short one, e.g.
from a full disk, is warned about and counts as not finished); failed
points are retried (with checkpointing, a preempted point resumes where it
stopped). The exit code is 1 if any point failed.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from absl import logging

from moco_jax.core.config import check_fields, flatten_dotted, no_such_field
from moco_jax.core.errors import ConfigError, NotFoundError
from moco_jax.training.checks import PRETRAINING_RULES
from moco_jax.training.metrics import (
    FINAL_NAME as FINAL_METRICS,  # the trainer's end-of-run record
)

# Sweeps run from a checkout (editable installs included): the config files
# and train.py live at the repository root, next to the package.
REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "train.py"
LOG_NAME = "train.log"
METRIC_COLUMNS = ("loss", "top1", "knn_backbone", "knn_projection", "step")
_MAX_NAME = 80


@dataclasses.dataclass(frozen=True)
class PointResult:
    """One row of the sweep table."""

    name: str
    overrides: Mapping[str, Any]
    status: str  # ok | failed (exit N) | not run
    metrics: Mapping[str, Any]
    log: str  # path of the point's train.log, '' if none


# ---------------------------------------------------------------------------
# The sweep definition.
# ---------------------------------------------------------------------------
def load_config_module(config_path: str):
    """The Python module of a config file. A trailing `:arg` (config_flags'
    syntax for `get_config(arg)`) is ignored here."""
    path = Path(config_path.split(":", 1)[0]).resolve()
    if not path.is_file():
        raise NotFoundError(f"config file {path} does not exist (give a .py file with get_config() and get_sweep(), "
                            "e.g. configs/sweep_example.py)")
    # Config files import their base config (`from configs import default`).
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's file raises, it is the file's error
        raise ConfigError(f"config file {path} cannot be loaded: {type(e).__name__}: {e}") from e
    return module


def load_sweep(config_path: str) -> list[dict[str, Any]]:
    """The checked points of the sweep a config file defines (see `sweep_points`
    and `check_points`)."""
    module = load_config_module(config_path)
    points = sweep_points(module)
    if hasattr(module, "get_config"):
        argument = config_path.split(":", 1)[1:]
        try:
            config = module.get_config(*argument)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{module.__file__}: get_config() failed: {type(e).__name__}: {e}") from e
        check_points(config, points, module.__file__)
    return points


def sweep_points(module) -> list[dict[str, Any]]:
    """The config module's `get_sweep()`, checked: a non-empty list of dicts
    with string keys and no duplicate points."""
    where = getattr(module, "__file__", "the config file")
    if not callable(getattr(module, "get_sweep", None)):
        raise ConfigError(f"{where} defines no get_sweep(); add one next to get_config(), returning a list of "
                          "{field: value} dicts (see configs/sweep_example.py)")
    try:
        points = list(module.get_sweep())
    except Exception as e:  # noqa: BLE001 - the user's function
        raise ConfigError(f"{where}: get_sweep() failed: {type(e).__name__}: {e}") from e
    if not points:
        raise ConfigError(f"{where}: get_sweep() returned no points")
    seen = set()
    for point in points:
        if not isinstance(point, Mapping) or not all(isinstance(k, str) for k in point):
            raise ConfigError(f"{where}: each sweep point must be a dict of field name -> value, got {point!r}")
        key = json.dumps(point, sort_keys=True, default=repr)
        if key in seen:
            raise ConfigError(f"{where}: duplicate sweep point {dict(point)}")
        seen.add(key)
    names = [point_name(p) for p in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"sweep points that differ only in value types share a directory name: {clashes}")
    return [dict(p) for p in points]


def check_points(config, points: Sequence[Mapping[str, Any]], where: str) -> None:
    """Every point names fields `config` has, with values of their types and
    in their ranges (`config.check_fields`), before any point runs. What
    depends on the devices (batch and queue divisibility, ...) is left to
    each point's train.py."""
    fields = flatten_dotted(config.to_dict())
    groups = {f.rsplit(".", 1)[0] for f in fields if "." in f}
    for point in points:
        candidate = config.copy_and_resolve_references()
        for name, value in point.items():
            if name in groups:
                continue
            if name not in fields:
                raise ConfigError(f"sweep point {dict(point)}: {no_such_field(name, list(fields), where)}")
            try:
                *parents, leaf = name.split(".")
                node = candidate
                for parent in parents:
                    node = node[parent]
                node[leaf] = value
            except (TypeError, ValueError):
                raise ConfigError(f"sweep point {dict(point)}: {name}={value!r} must be of type "
                                  f"{type(fields[name]).__name__}, like the config's {name}={fields[name]!r}") from None
        try:
            check_fields(candidate, PRETRAINING_RULES)
        except ConfigError as e:
            raise ConfigError(f"sweep point {dict(point)}: {e}") from None


def format_value(value: Any) -> str:
    """A value as config_flags parses it back: bools lower-case, tuples and
    lists as Python literals, everything else as str()."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
    """A stable directory name for a point: `field=value,field=value` with the
    fields sorted. Characters that do not belong in a path, or a name longer
    than 80 characters, get replaced / cut and a short hash of the overrides
    appended, so distinct points keep distinct names."""
    if not overrides:
        return "base"
    raw = ",".join(f"{k}={format_value(overrides[k])}" for k in sorted(overrides))
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", raw)
    if safe == raw and len(raw) <= _MAX_NAME:
        return raw
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:8]
    return f"{safe[:_MAX_NAME]}-{digest}"


def train_command(config_path: str, point_workdir: Path, overrides: Mapping[str, Any]) -> list[str]:
    """argv of the training process of one point."""
    config_path = os.path.abspath(config_path.split(":", 1)[0]) + (
        ":" + config_path.split(":", 1)[1] if ":" in config_path else ""
    )
    argv = [sys.executable, str(TRAIN_SCRIPT), f"--config={config_path}", f"--workdir={point_workdir}"]
    argv += [f"--config.{k}={format_value(overrides[k])}" for k in sorted(overrides)]
    return argv


# ---------------------------------------------------------------------------
# Running points and collecting results.
# ---------------------------------------------------------------------------
def read_final_metrics(point_workdir: Path) -> dict[str, Any] | None:
    """The point's `final_metrics.json`, or None where it is not finished: no
    such file, or one that cannot be read as a JSON object (empty or cut
    short, e.g. by a full disk; one warning naming it)."""
    path = point_workdir / FINAL_METRICS
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            final = json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        logging.warning("%s is unreadable (%s: %s); the point counts as not finished", path, type(e).__name__, e)
        return None
    if not isinstance(final, dict):
        logging.warning("%s holds no JSON object; the point counts as not finished", path)
        return None
    return final


def run_point(command: Sequence[str], point_workdir: Path) -> int:
    """Run one point to completion, its output in `train.log`; the exit code.

    A fresh log per attempt (a retried point's earlier failure stays in
    `train.log.1`)."""
    point_workdir.mkdir(parents=True, exist_ok=True)
    log = point_workdir / LOG_NAME
    if log.exists():
        log.replace(point_workdir / f"{LOG_NAME}.1")
    with open(log, "w") as f:
        f.write(shlex.join(command) + "\n\n")
        f.flush()
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode


def run_sweep(config_path: str, workdir: str, echo=print) -> list[PointResult]:
    """Run every unfinished point in order; write the tables after each."""
    points = load_sweep(config_path)
    workdir = Path(workdir).resolve()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file; give a directory for the sweep's points")
    workdir.mkdir(parents=True, exist_ok=True)
    results = {point_name(p): PointResult(point_name(p), p, "not run", {}, "") for p in points}
    for point in points:
        name = point_name(point)
        point_workdir = workdir / name
        final = read_final_metrics(point_workdir)
        if final is not None:
            echo(f"[sweep] {name}: finished earlier, skipped")
        else:
            echo(f"[sweep] {name}: running (log: {point_workdir / LOG_NAME})")
            code = run_point(train_command(config_path, point_workdir, point), point_workdir)
            final = read_final_metrics(point_workdir)
            if code != 0 or final is None:
                status = f"failed (exit {code})" if code != 0 else f"failed (no {FINAL_METRICS})"
                results[name] = PointResult(name, point, status, {}, str(point_workdir / LOG_NAME))
                echo(f"[sweep] {name}: {status}; see {point_workdir / LOG_NAME}")
                write_tables(workdir, list(results.values()))
                continue
        results[name] = PointResult(name, point, "ok", final, str(point_workdir / LOG_NAME))
        write_tables(workdir, list(results.values()))
    return list(results.values())


def dry_run_commands(config_path: str, workdir: str) -> list[str]:
    """The shell command of every unfinished point, one string each."""
    points = load_sweep(config_path)
    workdir = Path(workdir).resolve()
    return [
        shlex.join(train_command(config_path, workdir / point_name(p), p))
        for p in points
        if read_final_metrics(workdir / point_name(p)) is None
    ]


# ---------------------------------------------------------------------------
# The results table.
# ---------------------------------------------------------------------------
def table_rows(results: Sequence[PointResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row = {"point": r.name, "status": r.status}
        row.update({c: r.metrics.get(c, "") for c in METRIC_COLUMNS})
        row["overrides"] = json.dumps(dict(r.overrides), sort_keys=True, default=repr)
        row["log"] = r.log if r.status != "ok" else ""
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def write_tables(workdir: Path, results: Sequence[PointResult]) -> tuple[Path, Path]:
    """`sweep_results.csv` (raw numbers) and `sweep_results.md` in `workdir`."""
    rows = table_rows(results)
    columns = list(rows[0])
    csv_path, md_path = workdir / "sweep_results.csv", workdir / "sweep_results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path

"""`python -m moco_jax.sweep`: a 3-point sweep over the tiny config, one point
broken on purpose (queue_size not a multiple of batch_size)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moco_jax.launch import sweep
from moco_jax.training import metrics

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

SWEEP_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from tiny import tiny_config

def get_config():
    return tiny_config(num_train_steps=2, log_every_steps=1, knn_k=20)

# Seeds change no compiled code, so the second good point reuses the first's
# compilation (persistent cache); "model.dtype" checks that nested fields
# reach train.py.
def get_sweep():
    return [{{"seed": 1}}, {{"queue_size": 24}}, {{"seed": 2, "model.dtype": "float32"}}]
"""
POINTS = ["seed=1", "queue_size=24", "model.dtype=float32,seed=2"]


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_sweep.py"
    path.write_text(SWEEP_CONFIG.format(tests=str(TESTS)))
    return path


def _sweep(config: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moco_jax.sweep", f"--config={config}", f"--workdir={workdir}", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def _read_csv(workdir: Path) -> dict[str, dict[str, str]]:
    with open(workdir / "sweep_results.csv") as f:
        return {row["point"]: row for row in csv.DictReader(f)}


def test_point_names_are_stable_and_path_safe():
    assert sweep.point_name({"model.width": 8, "learning_rate": 0.06}) == "learning_rate=0.06,model.width=8"
    assert sweep.point_name({"learning_rate": 0.06, "model.width": 8}) == "learning_rate=0.06,model.width=8"
    assert sweep.point_name({}) == "base"
    odd = sweep.point_name({"crop_scale": (0.2, 1.0), "data_dir": "/a/b"})
    assert "/" not in odd and " " not in odd and odd == sweep.point_name({"data_dir": "/a/b", "crop_scale": (0.2, 1.0)})
    assert odd != sweep.point_name({"crop_scale": (0.2, 1.0), "data_dir": "/a_b"})

    class Clash:
        __file__ = "clash.py"

        @staticmethod
        def get_sweep():
            return [{"seed": 1}, {"seed": "1"}]

    with pytest.raises(ValueError, match="share a directory name"):
        sweep.sweep_points(Clash)


def test_dry_run_prints_one_train_command_per_point(tmp_path):
    config = _write_config(tmp_path)
    result = _sweep(config, tmp_path / "w", "--dry_run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, POINTS):
        assert "train.py" in line and f"--config={config}" in line
        assert f"--workdir={tmp_path / 'w' / name}" in line
    assert "--config.model.dtype=float32 --config.seed=2" in lines[2]
    assert not (tmp_path / "w").exists(), "a dry run must not create anything"


@pytest.mark.slow
def test_sweep_reports_a_failed_point_runs_the_others_and_skips_finished_ones_on_rerun(tmp_path):
    config, workdir = _write_config(tmp_path), tmp_path / "w"
    first = _sweep(config, workdir)
    assert first.returncode == 1, first.stdout + first.stderr  # one point failed
    rows = _read_csv(workdir)
    assert list(rows) == POINTS
    for name in (POINTS[0], POINTS[2]):
        row = rows[name]
        assert row["status"] == "ok", (row, (workdir / name / "train.log").read_text()[-3000:])
        assert math.isfinite(float(row["loss"])) and int(row["step"]) == 2
        for column in ("top1", "knn_backbone", "knn_projection"):
            assert 0.0 <= float(row[column]) <= 1.0, (column, row)
        final = json.loads((workdir / name / "final_metrics.json").read_text())
        assert float(row["loss"]) == final["loss"]
    failed = rows[POINTS[1]]
    assert failed["status"] == "failed (exit 1)" and failed["loss"] == ""
    assert failed["log"] == str(workdir / POINTS[1] / "train.log")
    assert "queue_size=24 must be a positive multiple of batch_size=16" in Path(failed["log"]).read_text()
    markdown = (workdir / "sweep_results.md").read_text()
    assert markdown.count("| ok |") == 2 and "| failed (exit 1) |" in markdown

    finished_logs = {n: (workdir / n / "train.log").stat().st_mtime_ns for n in (POINTS[0], POINTS[2])}
    second = _sweep(config, workdir)
    assert second.returncode == 1
    assert second.stdout.count("finished earlier, skipped") == 2, second.stdout
    assert {n: (workdir / n / "train.log").stat().st_mtime_ns for n in finished_logs} == finished_logs
    assert (workdir / POINTS[1] / "train.log.1").exists(), "the failed point is retried, its old log kept"
    assert _read_csv(workdir)[POINTS[0]]["loss"] == rows[POINTS[0]]["loss"]

    remaining = _sweep(config, workdir, "--dry_run").stdout.strip().splitlines()
    assert len(remaining) == 1 and f"--workdir={workdir / POINTS[1]}" in remaining[0]


def _empty_final(workdir: Path, name: str) -> Path:
    """A point whose final_metrics.json a full disk left at 0 bytes."""
    path = workdir / name / metrics.FINAL_NAME
    path.parent.mkdir(parents=True)
    path.touch()
    return path


def _finished(workdir: Path, name: str) -> None:
    """A point that trained to the end."""
    (workdir / name).mkdir(parents=True)
    metrics.write_final(str(workdir / name), {"step": 2, "loss": 1.0})


def test_dry_run_counts_an_empty_final_metrics_as_not_finished(tmp_path):
    config, workdir = _write_config(tmp_path), tmp_path / "w"
    empty = _empty_final(workdir, POINTS[0])
    _finished(workdir, POINTS[2])
    result = _sweep(config, workdir, "--dry_run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("--workdir=")[1].split()[0] for line in lines] == [str(workdir / n) for n in POINTS[:2]]
    warnings = [line for line in result.stderr.splitlines() if str(empty) in line]
    assert len(warnings) == 1 and "not finished" in warnings[0], result.stderr


def test_sweep_reruns_a_point_whose_final_metrics_is_cut_short(tmp_path, monkeypatch, caplog):
    config, workdir = _write_config(tmp_path), tmp_path / "w"
    empty = _empty_final(workdir, POINTS[0])
    (workdir / POINTS[1]).mkdir()
    (workdir / POINTS[1] / metrics.FINAL_NAME).write_text('{"loss": 0.5, "st')  # cut short
    _finished(workdir, POINTS[2])
    ran = []

    def train(command, point_workdir):  # stands in for train.py
        ran.append(point_workdir.name)
        metrics.write_final(str(point_workdir), {"step": 2, "loss": 0.25})
        return 0

    monkeypatch.setattr(sweep, "run_point", train)
    results = sweep.run_sweep(str(config), str(workdir), echo=lambda line: None)
    assert ran == POINTS[:2]
    assert [(r.status, r.metrics["loss"]) for r in results] == [("ok", 0.25), ("ok", 0.25), ("ok", 1.0)]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and str(empty) in warned[0] and str(workdir / POINTS[1]) in warned[1], warned

"""A newcomer's first hour: the console, the lifecycle messages, fields that
would be ignored, `--help`, and the config field listing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moco_jax.core import config as config_lib
from moco_jax.training import checks
from moco_jax.core.errors import ConfigError
from moco_jax.launch import cli
from moco_jax.training import console, metrics
from tiny import tiny_config
from test_cli_errors import PROGRAMS, run_in_process

REPO = Path(__file__).resolve().parent.parent
# tests/tiny.py's config as train.py flags, on one CPU device, 6 steps.
TINY_FLAGS = ["--config.image_size=8", "--config.crop_size=8", "--config.model.width=4", "--config.embed_dim=8",
              "--config.batch_size=16", "--config.queue_size=32", "--config.bn_splits=2",
              "--config.eval_batch_size=512", "--config.log_every_steps=2", "--config.num_train_steps=6"]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def _train(*args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one device
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _files(workdir: Path) -> dict[str, tuple[int, int]]:
    """Every file under `workdir` with its size and modification time."""
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_finished_run_relaunched_says_so_and_trains_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    first = _train(f"--workdir={workdir}", *TINY_FLAGS)
    assert first.returncode == 0, first.stderr[-3000:]
    # The console: short log lines (no absl prefix), no bar or carriage return
    # when stderr is not a terminal, no third-party probe.
    assert "\r" not in first.stderr
    log_lines = [line for line in first.stderr.splitlines() if line.strip()]
    assert log_lines and all(LOG_LINE.match(line) for line in log_lines), first.stderr[-3000:]
    assert "Unable to initialize backend" not in first.stderr
    assert re.search(r"MoCo v1/v2 .*ResNet-10 \(width 4, cifar stem\) with an MLP head, [\d,]+ trainable "
                     "parameters", first.stderr)
    assert re.search(r"step 2/6: .*loss=", first.stderr)
    # The summary: the split used, the workdir's files, what to run next.
    assert "queries: the test split" in first.stdout
    for text in ("checkpoints/", "metrics.jsonl", "events.out.tfevents.*", "final_metrics.json",
                 f"python -m moco_jax.knn_eval --pretrained {workdir}"):
        assert text in first.stdout, first.stdout
    before = _files(workdir)

    again = _train(f"--workdir={workdir}", *TINY_FLAGS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{workdir} is complete (step 6 of 6" in again.stderr
    assert "step 2/6" not in again.stderr  # nothing trained
    assert _files(workdir) == before  # no new event file, no rewritten metrics or checkpoint
    result = [line for line in again.stdout.splitlines() if "random init" in line]
    assert result == [line for line in first.stdout.splitlines() if "random init" in line]


@pytest.mark.slow
def test_a_run_without_workdir_warns_that_nothing_will_be_saved(tmp_path):
    run = _train(*TINY_FLAGS, "--config.num_train_steps=2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "WARNING no --workdir: nothing will be saved" in run.stderr
    assert "Nothing was saved (no --workdir)" in run.stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("override, field", [("--config.model.width=32", "model.width"),
                                             ("--config.model.depth=50", "model.depth")])
def test_resnet_fields_on_a_vit_config_are_refused(override, field, capfd):
    code = run_in_process("train", ["--config=configs/moco_v3_tiny.py", override])
    err = capfd.readouterr().err
    assert code == 1
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: --config.{field} applies only to a ResNet encoder and would be ignored")


def test_check_overrides_knows_each_encoder_and_method():
    resnet_v2, vit_v3 = tiny_config(), tiny_config()
    vit_v3.method, vit_v3.model.arch, vit_v3.queue_size, vit_v3.shuffle_bn = "moco_v3", "vit", 0, False
    checks.check_overrides(resnet_v2, ["model.width", "model.depth", "model.head", "symmetric_loss"])
    checks.check_overrides(vit_v3, ["model.vit", "model.patch_size", "model.mlp_dim", "batch_size"])
    for config, field in ((resnet_v2, "model.vit"), (resnet_v2, "model.patch_size"), (resnet_v2, "model.mlp_dim"),
                          (vit_v3, "model.stem"), (vit_v3, "model.head"), (vit_v3, "symmetric_loss")):
        with pytest.raises(ConfigError, match=f"--config.{re.escape(field)} applies only to"):
            checks.check_overrides(config, [field])


def test_shuffle_bn_over_one_group_warns_with_the_fix():
    config = tiny_config(batch_size=16, bn_splits=1)
    assert "shuffles nothing" in checks.startup_warning(config, 1)
    assert "--config.bn_splits=0" in checks.startup_warning(config, 1)
    assert checks.startup_warning(config, 2) == ""  # two devices: two groups
    config.bn_splits = 0
    assert checks.startup_warning(config, 1) == ""  # 8 splits of 2
    config.batch_size = 68
    assert "found 4 BN groups, not 8" in checks.startup_warning(config, 1)
    config.shuffle_bn = False
    assert checks.startup_warning(config, 1) == ""


def test_imagenet_configs_shuffle_over_eight_groups_on_one_device():
    for name in ("moco_v1_imagenet.py", "moco_v2_imagenet.py"):
        config = cli.load_config_file(str(REPO / "configs" / name))
        assert checks.startup_warning(config, 1) == "", name


@pytest.mark.parametrize("program", [*PROGRAMS, "checkpoints", "config_fields"])
def test_help_exits_0_and_shows_the_programs_own_flags(program, capfd, monkeypatch):
    monkeypatch.setitem(PROGRAMS, program, PROGRAMS.get(program, ("module", f"moco_jax.{program}")))
    assert run_in_process(program, ["--help"]) == 0
    out = capfd.readouterr().out
    assert "--verbose" in out and "--helpfull" in out
    if program in ("train", "linear_eval", "sweep", "config_fields"):
        assert "--config" in out
    assert "--alsologtostderr" not in out  # absl's own flags stay in --helpfull


def test_help_of_the_installed_program_from_another_directory(tmp_path):
    run = subprocess.run([sys.executable, "-m", "moco_jax.train", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--config" in run.stdout and "python -m moco_jax.train" in run.stdout


def test_config_fields_lists_every_field_with_its_default_and_comment(tmp_path):
    run = subprocess.run([sys.executable, "-m", "moco_jax.config_fields", "--config", "configs/moco_v3_tiny.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)  # another directory
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    config = cli.load_config_file(str(REPO / "configs" / "moco_v3_tiny.py"))
    fields = config_lib.flatten_dotted(config.to_dict())
    assert lines[0].endswith(f"{len(fields)} fields; set any with --config.<field>=<value>")
    assert "model.vit = 'test'" in run.stdout
    assert re.search(r"^bn_splits = 1 +# BN groups per device", run.stdout, re.M)  # a comment of default.py
    undocumented = [line for line in lines[1:] if "#" not in line]
    assert undocumented == [], undocumented


def test_config_paths_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_config_path("configs/default.py") == str(REPO / "configs" / "default.py")
    assert cli.resolve_config_path("configs/default.py:x") == str(REPO / "configs" / "default.py") + ":x"
    assert cli.resolve_config_path("nowhere.py") == "nowhere.py"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.py").write_text("")
    assert cli.resolve_config_path("configs/default.py") == "configs/default.py"  # the local file wins


def test_console_lines_are_short_and_drop_library_info(capsys):
    handler = console.ConsoleHandler()
    import logging

    def record(level, msg, path):
        return logging.LogRecord("x", level, path, 1, msg, (), None)

    ours = record(logging.INFO, "step 1: loss=1", os.path.join(console._PACKAGE_DIR, "training", "trainer.py"))
    probe = record(logging.INFO, "Unable to initialize backend 'tpu'", "/v/site-packages/jax/_src/xla_bridge.py")
    orbax = record(logging.WARNING, "Given directory is read only=/x", "/v/site-packages/orbax/checkpoint/cm.py")
    real = record(logging.WARNING, "disk almost full", "/v/site-packages/orbax/checkpoint/cm.py")
    for r in (ours, probe, orbax, real):
        handler.handle(r)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].endswith(" INFO step 1: loss=1") and err[1].endswith(" WARNING disk almost full")
    assert all(LOG_LINE.match(line) for line in err)


def test_console_line_omits_the_noisy_scalars_and_shows_progress():
    line = metrics.console_line(20, {"loss": 5.2251, "weight_norm/head": 3.0, "step_time_ms": 4.0, "top1": 0.5},
                                "/660 (eta 0:31)")
    assert line == "step 20/660: loss=5.225, top1=0.5 (eta 0:31)"
    assert metrics.console_line(0, {"weight_norm/head": 1.0}) == ""
    assert console.eta(31) == "0:31" and console.eta(3723) == "1:02:03"


def test_the_progress_bar_starts_after_the_first_step_and_only_on_a_terminal(monkeypatch):
    assert list(console.progress(range(3, 7), 6, enabled=True)) == [3, 4, 5, 6]  # stderr captured: no bar
    assert list(console.progress(range(7, 7), 6, enabled=True)) == []


def test_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(data_dir="data/cifar")
    assert config_lib.with_absolute_paths(config).data_dir == str(tmp_path / "data" / "cifar")
    config.data_dir = "gs://bucket/tfds"
    assert config_lib.with_absolute_paths(config).data_dir == "gs://bucket/tfds"

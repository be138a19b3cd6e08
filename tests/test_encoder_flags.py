"""One flag for the pretrained encoder in every program, and what the linear
probe program writes.

`--pretrained` (a workdir, .msgpack, .safetensors or .pth.tar) in export,
knn_eval and linear_eval; the old spellings (export's --workdir,
linear_eval's --config.pretrained) still work. linear_eval defaults its
config, logs like pretraining (metrics.jsonl, the console line), writes
final_metrics.json, and a relaunch of a finished probe retrains nothing.

The programs run in this process (`test_cli_errors.run_in_process`): a
subprocess each would cost the jax import every time.
"""

import json
import os

import pytest
from absl import logging as absl_logging

from moco_jax.io import formats
from moco_jax.launch import cli
from test_cli_errors import ERROR, USAGE, assert_one_line_error, run_in_process
from test_pretrained import random_variables
from tiny import tiny_config


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A flax export of a random tiny encoder (digits, 8x8), and a junk file."""
    root = tmp_path_factory.mktemp("encoder")
    config = tiny_config()
    formats.write_flax(str(root / "enc.msgpack"), config, random_variables(config))
    (root / "junk.msgpack").write_bytes(b"\x00not msgpack" * 20)
    return root


@pytest.fixture(autouse=True)
def _console(monkeypatch):
    """No tracebacks; INFO lines on the console, as in a fresh process (an
    earlier in-process run may have left absl at WARNING)."""
    monkeypatch.delenv(cli.ENV_VERBOSE, raising=False)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    yield
    absl_logging.set_verbosity(verbosity)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def test_export_takes_pretrained(encoder, tmp_path, capfd):
    status = run_in_process("export", [f"--pretrained={encoder}/enc.msgpack", "--format=torchvision",
                                       f"--output={tmp_path}/enc"])
    out, err = capfd.readouterr()
    assert status == 0, err
    assert (tmp_path / "enc.safetensors").is_file() and "wrote torchvision export" in out
    assert "warning" not in err, err


def test_export_workdir_still_works_with_a_one_line_warning(encoder, tmp_path, capfd):
    status = run_in_process("export", ["--workdir", f"{encoder}/enc.msgpack", "--output", f"{tmp_path}/enc"])
    out, err = capfd.readouterr()
    assert status == 0, err
    assert (tmp_path / "enc.msgpack").is_file() and "wrote flax export" in out
    assert [line for line in lines(err) if "warning" in line] == [
        "warning: --workdir is now --pretrained (the old name still works for this release)"], err


def test_export_needs_one_encoder(encoder, tmp_path, capfd):
    status = run_in_process("export", [f"--pretrained={encoder}/enc.msgpack", f"--workdir={encoder}/junk.msgpack",
                                       f"--output={tmp_path}/x"])
    assert_one_line_error(status, capfd.readouterr().err, USAGE, ["--pretrained=", "--workdir=", "different"])
    status = run_in_process("export", [f"--output={tmp_path}/x"])
    assert_one_line_error(status, capfd.readouterr().err, USAGE, ["--pretrained is required", ".safetensors"])


# ---------------------------------------------------------------------------
# linear_eval
# ---------------------------------------------------------------------------
QUICK = ["--config.num_train_steps=20", "--config.log_every_steps=10"]


def test_linear_eval_takes_pretrained_without_config(encoder, tmp_path, capfd, monkeypatch):
    """From another directory, no --config (configs/linear_cifar10.py), features
    mode: metrics.jsonl and the console line as in pretraining, and
    final_metrics.json."""
    monkeypatch.chdir(tmp_path)
    status = run_in_process("linear_eval", [f"--pretrained={encoder}/enc.msgpack", "--config.mode=features",
                                            "--workdir=probe", *QUICK])
    out, err = capfd.readouterr()
    assert status == 0, err
    final = json.loads((tmp_path / "probe" / "final_metrics.json").read_text())
    assert {k: final[k] for k in ("step", "pretrained", "mode", "dataset")} == {
        "step": 20, "pretrained": f"{encoder}/enc.msgpack", "mode": "features", "dataset": "digits"}
    assert 0 <= final["top1"] <= final["top5"] <= 1
    assert f"top-1 {final['top1']:.2%}" in out
    records = [json.loads(line) for line in lines((tmp_path / "probe" / "metrics.jsonl").read_text())]
    assert [r["step"] for r in records] == [10, 20] and all(r["loss"] > 0 for r in records)
    assert "step 10/20: loss=" in err and "{'loss'" not in err + out, err


def test_linear_eval_keeps_config_pretrained(encoder, capfd):
    status = run_in_process("linear_eval", [f"--config.pretrained={encoder}/junk.msgpack"])  # reaches the loader
    assert_one_line_error(status, capfd.readouterr().err, ERROR, ["junk.msgpack is not a moco_jax flax export"])
    status = run_in_process("linear_eval", [f"--pretrained={encoder}/enc.msgpack",
                                            f"--config.pretrained={encoder}/junk.msgpack"])
    assert_one_line_error(status, capfd.readouterr().err, USAGE,
                          ["--pretrained=", "--config.pretrained=", "different encoders"])
    status = run_in_process("linear_eval", ["--config.mode=features"])
    assert_one_line_error(status, capfd.readouterr().err, USAGE, ["--pretrained is required"])


FULL = ["--config.batch_size=16", "--config.num_train_steps=4", "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.eval_batch_size=128", "--config.learning_rate=0.5"]


@pytest.mark.slow
def test_relaunch_of_a_finished_full_probe_trains_nothing(encoder, tmp_path, capfd):
    """Full mode, 4 steps on 8 devices; the relaunch prints the stored result
    and adds nothing to the workdir. Without final_metrics.json (a run killed
    after its last checkpoint) a relaunch only evaluates."""
    args = [f"--pretrained={encoder}/enc.msgpack", f"--workdir={tmp_path}", *FULL]
    assert run_in_process("linear_eval", args) == 0
    out, err = capfd.readouterr()
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["mode"] == "full" and f"top-1 {final['top1']:.2%}" in out
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in lines(logged)] == [2, 4] and "step 2/4: loss=" in err
    files = sorted(os.listdir(tmp_path))

    assert run_in_process("linear_eval", args) == 0
    out, err = capfd.readouterr()
    assert "already complete" in out and f"top-1 {final['top1']:.2%}" in out, out
    assert "step 2/" not in err and "step 4/" not in err, err
    assert (tmp_path / "metrics.jsonl").read_text() == logged and sorted(os.listdir(tmp_path)) == files

    os.remove(tmp_path / "final_metrics.json")
    assert run_in_process("linear_eval", args) == 0
    out, err = capfd.readouterr()
    assert "nothing to train" in err and "step 2/" not in err and "step 4/" not in err, err
    assert (tmp_path / "metrics.jsonl").read_text() == logged
    again = json.loads((tmp_path / "final_metrics.json").read_text())
    assert (again["step"], again["top1"], again["top5"]) == (4, final["top1"], final["top5"])

"""The linear probe as one JAX job of two processes on 127.0.0.1 (4
emulated CPU devices each, gloo collectives), against one process with 8
devices: `python -m moco_jax.linear_eval` joins the job as train.py does,
each process reads its share of the images, and the result is the same."""

import json
import sys
import time

import numpy as np
import pytest

from configs import linear_cifar10
from moco_jax import pretrained
from moco_jax.io import formats
from moco_jax.training import probe
from test_multiprocess import _free_port, _start, _tails, _wait
from test_pretrained import random_variables
from tiny import tiny_config

FLAGS = {"batch_size": 16, "learning_rate": 0.5, "eval_batch_size": 64, "num_train_steps": 6, "log_every_steps": 2,
         "checkpoint_every_steps": 3}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "features"])
def test_a_two_process_probe_equals_the_one_process_probe(tmp_path, mode):
    encoder = pretrained.Encoder(tiny_config(), random_variables(tiny_config()))
    path = str(tmp_path / "enc.msgpack")
    formats.write_flax(path, encoder.config, encoder.variables)
    config = linear_cifar10.get_config()
    config.update(pretrained=path, mode=mode, **FLAGS)
    one = probe.evaluate(config, str(tmp_path / "one"), pretrained.load(path))

    port, workdir = _free_port(), tmp_path / "two"
    commands = [[sys.executable, "-m", "moco_jax.linear_eval", f"--pretrained={path}", f"--workdir={workdir}",
                 f"--config.mode={mode}", *[f"--config.{k}={v}" for k, v in FLAGS.items()],
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
                for i in range(2)]
    started = time.monotonic()
    codes = _wait(_start(commands, tmp_path / "logs"), tmp_path / "logs", started)
    assert codes == [0, 0], _tails(tmp_path / "logs", 2)

    two = json.loads((workdir / "final_metrics.json").read_text())
    assert (two["top1"], two["top5"], two["step"]) == (one["top1"], one["top5"], one["step"])
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    np.testing.assert_allclose(losses, [h["loss"] for h in one["history"]], rtol=1e-5)

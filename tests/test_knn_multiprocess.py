"""The streamed kNN in a multi-process job: `python -m moco_jax.knn_eval` in
two processes on 127.0.0.1, 4 emulated CPU devices each (gloo collectives),
against one process with 8 devices and against one device."""

import re
import sys
import time

import pytest

from moco_jax import knn_eval, pretrained
from moco_jax.io import formats
from test_knn_eval import one_device_accuracies
from test_multiprocess import _free_port, _start, _tails, _wait
from test_pretrained import random_variables
from tiny import tiny_config


@pytest.mark.slow
def test_knn_eval_in_two_processes_measures_what_one_process_and_one_device_do(tmp_path):
    """Bank: a fixed random 1000 of the 1438 digits, in 42 steps of 24 (3 per
    device, the last one padded), each device keeping its shard; queries: the
    359 test digits, each device's top k merged across the processes. Both
    kinds of feature: the accuracies process 0 prints are those of 8 devices
    in one process and those of `knn_predict` on one device."""
    config = tiny_config(knn_k=20, knn_temperature=0.07, knn_max_train_images=1000)
    path = str(tmp_path / "encoder.msgpack")
    formats.write_flax(path, config, random_variables(config))
    port = _free_port()
    commands = [[sys.executable, "-m", "moco_jax.knn_eval", f"--pretrained={path}", "--k=20", "--temperature=0.07",
                 "--batch_size=24", "--max_train_images=1000", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}"] for i in range(2)]
    logs = tmp_path / "logs"
    started = time.monotonic()
    procs = _start(commands, logs)
    try:  # the references, while the two processes run
        encoder = pretrained.load(path)
        one_process = encoder.knn_accuracies(knn_eval.load_dataset(encoder, max_train_images=1000), k=20,
                                             temperature=0.07, batch_size=24)
        one_device, bank_size = one_device_accuracies(config, encoder.variables)
    finally:
        codes = _wait(procs, logs, started)
    assert codes == [0, 0], _tails(logs, 2)
    assert dict(one_process) == one_device and one_process.bank_size == bank_size == 1000
    out = (logs / "process_0.log").read_text()
    assert "bank: 1000 images of split 'train' (a fixed random 1000 of its 1438 images); queries: 359 images of " \
           "split 'test'" in out, out[-3000:]
    printed = {name: float(value) / 100 for name, value in re.findall(r"(\w+)\s+top-1 ([\d.]+)%", out)}
    assert printed.keys() == one_device.keys(), out[-3000:]
    for name, accuracy in one_device.items():  # two decimals of a percent tell counts out of 359 apart
        assert printed[name] == pytest.approx(accuracy, abs=5e-5), (name, out[-3000:])
    assert "top-1" not in (logs / "process_1.log").read_text(), "one process reports"

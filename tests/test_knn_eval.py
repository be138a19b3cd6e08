"""The kNN evaluation CLI against the in-training monitor."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moco_jax import data, pretrained
from moco_jax.data.sources import arrays
from moco_jax.eval import embed, knn
from moco_jax.io import formats
from test_pretrained import random_variables, tiny_pretraining
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_knn_cli_agrees_with_the_training_monitor():
    """`python -m moco_jax.knn_eval --pretrained=<workdir>` prints what
    `trainer.train_and_evaluate` measured at the end of training."""
    _, workdir, result = tiny_pretraining()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "moco_jax.knn_eval", f"--pretrained={workdir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    for name in ("backbone", "projection"):
        assert f"{name:<10} top-1 {result['knn_trained'][name]:.2%}" in out, out
    # MoCo learned: backbone kNN seen 43% at initialisation, 67% after the 100 steps (two seeds).
    assert result["knn_trained"]["backbone"] > result["knn_random"]["backbone"] + 0.1, result


def test_backbone_only_encoder_gives_the_same_backbone_accuracy(tmp_path):
    config = tiny_config()
    variables = random_variables(config)
    dataset = arrays.load_digits(image_size=8)
    paths = {fmt: str(tmp_path / f"e.{ext}") for fmt, ext in (("flax", "msgpack"), ("torchvision", "safetensors"))}
    formats.write_flax(paths["flax"], config, variables)
    formats.write_torchvision(paths["torchvision"], config, variables)
    with_head = pretrained.load(paths["flax"]).knn_accuracies(dataset, k=20, temperature=0.07)
    without = pretrained.load(paths["torchvision"]).knn_accuracies(dataset, k=20, temperature=0.07,
                                                                   features=("backbone",))
    assert set(with_head) == {"backbone", "projection"}
    np.testing.assert_allclose(without["backbone"], with_head["backbone"], atol=1 / len(dataset.test_labels))
    with pytest.raises(ValueError, match="no projection head"):
        pretrained.load(paths["torchvision"]).knn_accuracies(dataset)


def one_device_accuracies(config, variables):
    """The reference for the monitor: the monitor's images in host arrays,
    their features on one device, the single-device `knn_predict`."""
    dataset = knn.monitor_dataset(data.open_source(config), config)
    embed_fn = embed.make_embed_fn(config)
    accuracies = {}
    for kind, name in enumerate(embed.FEATURES):
        extract = lambda x: embed_fn(variables, x)[kind]  # noqa: E731, B023
        bank, queries = (knn.extract_features(extract, x, 256) for x in (dataset.train_images, dataset.test_images))
        scores = knn.knn_predict(queries, bank, dataset.train_labels, dataset.num_classes, k=config.knn_k,
                                 temperature=config.knn_temperature)
        accuracies[name] = float(np.mean(np.asarray(scores).argmax(1) == dataset.test_labels))
    return accuracies, len(dataset.train_labels)


@pytest.mark.parametrize("cap", [0, 1000])
def test_the_streamed_monitor_measures_what_one_device_does(cap):
    """`embed.knn_monitor` (bank and queries streamed over 8 devices, in
    steps of 24, the last one padded) gives the accuracies of features
    extracted on one device and scored by `knn_predict`, and names its bank:
    all 1438 digits of the train split, or a fixed random 1000 of them."""
    config = tiny_config(knn_k=20, eval_batch_size=24, knn_max_train_images=cap)
    variables = random_variables(config)
    monitor = embed.knn_monitor(config, data.open_source(config))
    result = monitor(variables)
    want, bank_size = one_device_accuracies(config, variables)
    assert dict(result) == want
    assert result.bank_size == monitor.bank_size == bank_size == (cap or 1438) and result.num_queries == 359
    described = "a fixed random 1000 of its 1438 images" if cap else "split 'train'; queries: 359 images"
    assert f"bank: {bank_size} images of split 'train'" in monitor.describe() and described in monitor.describe()
    lowerings = []
    listen = lambda event, duration, **kw: lowerings.append(event) if event.endswith("to_mlir_module_duration") \
        else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:  # other variables: the monitor streams again, its steps compiled once
        assert monitor(jax.tree.map(lambda x: x * 0.5, variables)) != result and monitor(variables) == result
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not lowerings, lowerings


def _encoder_reading(tmp_path, **data_fields):
    """A flax export whose pretraining config reads an image folder."""
    config = tiny_config(dataset="image_folder", **data_fields)
    path = str(tmp_path / "enc.msgpack")
    formats.write_flax(path, config, random_variables(config))
    return path


def test_a_relative_data_dir_of_the_encoder_asks_for_data_dir(tmp_path, capfd, monkeypatch):
    """An encoder trained (by an older train.py) with data_dir='images' from
    another directory: one line that says the stored data_dir is relative and
    to pass --data_dir, not a hint about --config fields knn_eval lacks."""
    from test_cli_errors import ERROR, assert_one_line_error, run_in_process

    monkeypatch.delenv("MOCO_JAX_VERBOSE", raising=False)
    monkeypatch.chdir(tmp_path)
    status = run_in_process("knn_eval", [f"--pretrained={_encoder_reading(tmp_path, data_dir='images')}"])
    err = capfd.readouterr().err
    assert_one_line_error(status, err, ERROR, ["data_dir='images'", "relative", "--data_dir="])
    assert "--config." not in err


def test_knn_eval_hints_name_its_own_flags(tmp_path, capfd, monkeypatch):
    """The image folder's hint about the split (`--config.train_split` in
    train.py) names no flag knn_eval lacks."""
    from test_cli_errors import ERROR, assert_one_line_error, run_in_process

    monkeypatch.delenv("MOCO_JAX_VERBOSE", raising=False)
    status = run_in_process("knn_eval", [f"--pretrained={_encoder_reading(tmp_path, data_dir=str(tmp_path))}"])
    err = capfd.readouterr().err
    assert_one_line_error(status, err, ERROR, ["does not exist", "train_split"])
    assert "--config." not in err


@pytest.mark.parametrize("flags,words", [
    (["--num_processes=2"], ["incomplete multi-process settings", "coordinator_address"]),
    (["--max_train_images=-1"], ["--max_train_images=-1", ">= 0"]),
])
def test_knn_eval_refuses_a_bad_process_layout_and_bank_cap_in_one_line(tmp_path, capfd, monkeypatch, flags, words):
    """knn_eval's multi-process flags are train.py's, checked the same way."""
    from test_cli_errors import ERROR, assert_one_line_error, run_in_process

    monkeypatch.delenv("MOCO_JAX_VERBOSE", raising=False)
    path = str(tmp_path / "enc.msgpack")
    formats.write_flax(path, tiny_config(), random_variables(tiny_config()))
    status = run_in_process("knn_eval", [f"--pretrained={path}", *flags])
    assert_one_line_error(status, capfd.readouterr().err, ERROR, words)

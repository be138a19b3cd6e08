"""The kNN evaluation CLI against the in-training monitor."""

import os
import subprocess
import sys

import numpy as np
import pytest

from moco_jax import pretrained
from moco_jax.data.sources import arrays
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

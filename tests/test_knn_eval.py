"""The kNN evaluation CLI against the in-training monitor."""

import os
import subprocess
import sys

import numpy as np
import pytest

from moco_jax import pretrained
from moco_jax.data import arrays
from moco_jax.io import formats
from test_pretrained import random_variables, tiny_pretraining
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

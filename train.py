"""Pretrain an encoder with MoCo.

  python train.py                                     # configs/default.py
  python train.py --config configs/moco_v2_cifar10.py --workdir /tmp/moco_cifar
  python train.py --config.batch_size=256 --config.model.depth=18
"""

import os

from absl import app, flags
from ml_collections import config_flags

from moco_jax import trainer

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics (and, later, checkpoints) are written.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    random, trained = result["knn_random"], result["knn_trained"]
    print(f"kNN accuracy (k={_CONFIG.value.knn_k}, T={_CONFIG.value.knn_temperature}) on the test split:")
    for name in ("backbone", "projection"):
        print(f"  {name:<10}  random init {random[name]:6.1%}  ->  MoCo {trained[name]:6.1%}")


if __name__ == "__main__":
    app.run(main)

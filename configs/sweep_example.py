"""A small learning-rate x temperature sweep on the digits default.

`get_config()` is configs/default.py shrunk to a width-8 ResNet-10 trained
for 10 epochs (about a minute per point on a 2-core CPU); `get_sweep()` lists
the points as overrides of its fields (dotted names for nested fields).

Run every point, one after another, each in <workdir>/<point>/:
  python -m moco_jax.sweep --config configs/sweep_example.py --workdir /tmp/moco_sweep
Print the commands instead (one line per point, for a cluster scheduler):
  python -m moco_jax.sweep --config configs/sweep_example.py --workdir /tmp/moco_sweep --dry_run
One point on its own, as any config:
  python train.py --config configs/sweep_example.py --config.learning_rate=0.12

Results: /tmp/moco_sweep/sweep_results.md and .csv (loss, InfoNCE top-1 and
the kNN accuracies of every point).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.width = 8
    config.num_epochs = 10
    config.log_every_steps = 10
    return config


def get_sweep() -> list[dict]:
    return [
        {"learning_rate": lr, "temperature": t}
        for lr in (0.03, 0.06, 0.12)
        for t in (0.1, 0.2)
    ] + [{"learning_rate": 0.06, "model.width": 16}]

"""Linear classification on frozen MoCo features (the standard protocol).

  python -m moco_jax.linear_eval --config configs/linear_cifar10.py \
      --config.pretrained=/tmp/moco --workdir /tmp/moco_linear
  python -m moco_jax.linear_eval --config configs/linear_cifar10.py \
      --config.pretrained=/tmp/moco --config.mode=features          # quick CPU check

The protocol and both modes are described in `moco_jax.eval.linear`.
"""

from __future__ import annotations

from absl import flags

from moco_jax.eval import linear
from moco_jax.launch import cli
from moco_jax.training.metrics import quiet_library_logs


def main(argv):
    del argv  # cli.run refuses extra arguments
    quiet_library_logs()
    config = flags.FLAGS.config
    result = linear.evaluate(config, flags.FLAGS.workdir, fresh_start=flags.FLAGS.fresh_start)
    print(f"linear eval ({config.mode}) of {config.pretrained} on {config.dataset}: "
          f"top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}")


if __name__ == "__main__":
    cli.define_config_file("config", None, "Linear evaluation config, e.g. configs/linear_cifar10.py.")
    flags.DEFINE_string("workdir", None, "Checkpoints of the classifier (full mode); a relaunch resumes.")
    flags.DEFINE_bool("fresh_start", False, "Start over in a workdir whose checkpoints are all unusable "
                      "(without it such a relaunch refuses).")
    flags.mark_flags_as_required(["config"])
    cli.run(main)

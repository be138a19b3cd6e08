"""Pretrain an encoder with MoCo: runs the program `moco_jax/train.py`, which
is also `python -m moco_jax.train` from any directory once the package is
installed. `python train.py --help` lists its flags.

  python train.py --workdir runs/default              # configs/default.py
  python train.py --config configs/moco_v2_cifar10.py --workdir runs/cifar10
"""

import runpy

from moco_jax.training import preemption

preemption.exit_on_signal()  # from the first line on: SIGTERM / SIGINT end the start-up in one line

if __name__ == "__main__":
    runpy.run_module("moco_jax.train", run_name="__main__", alter_sys=True)
else:  # `import train` (tests): the program's flags and main
    from moco_jax.train import main  # noqa: E402, F401

"""Runs one training job in a child process, for the preemption tests.

    python tests/train_worker.py NUM_DEVICES WORKDIR '{"num_train_steps": 6}' [HANG_AT_STEP]

The device count must be fixed before JAX is imported, hence a process of its
own. With HANG_AT_STEP the process blocks (forever) when it reaches that step,
after every earlier checkpoint has been written, so the test can SIGKILL it at
a known point: a preemption, not a clean exit.
"""

import json
import os
import sys
import time

num_devices, workdir, overrides = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
hang_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

from moco_jax.training import trainer  # noqa: E402
from tiny import tiny_config  # noqa: E402

if hang_at:
    make_real_step = trainer.make_train_step

    def make_hanging_step(*args):
        step_fn = make_real_step(*args)

        def step(p_state, batch):
            if int(p_state.step.addressable_shards[0].data[0]) + 1 == hang_at:
                print(f"hanging at step {hang_at}", flush=True)
                time.sleep(3600)
            return step_fn(p_state, batch)

        return step

    trainer.make_train_step = make_hanging_step

trainer.train_and_evaluate(tiny_config(**overrides), workdir=workdir, show_progress=False)
print("finished", flush=True)

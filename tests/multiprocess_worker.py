"""One process of the two-process test (tests/test_multiprocess.py).

  python tests/multiprocess_worker.py --coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=I --workdir=W --out=DIR [--config.x=y ...]

Joins the run like train.py does (distributed start-up, the config check),
then trains the tiny config for `--first_steps` steps through the real
trainer, which checkpoints at the end, and calls the trainer again for
`--config.num_train_steps` steps: that call resumes from the checkpoint.
With `--sigterm_at_step=N` the first call is meant to run all the steps,
but process 1 sends itself SIGTERM once it has dispatched step N: JAX's
preemption service tells process 0, both stop at the step they agree on,
save it and return; the second call resumes from there.
Writes DIR/process_I.json (the losses each call logged, the devices it saw)
and DIR/process_I.npz (its host copy of the final state: the whole queue
and the parameters), so the test can check every process holds the same.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # moco_jax

from moco_jax.launch import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (the test's tiny config).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Shared workdir (checkpoints).")
_OUT = flags.DEFINE_string("out", None, "Where this process writes its results.")
_FIRST_STEPS = flags.DEFINE_integer("first_steps", 3, "Steps of the first call (then checkpoint).")
_SIGTERM_AT = flags.DEFINE_integer("sigterm_at_step", 0, "Process 1 sends itself SIGTERM at this step of the "
                                   "first call, which then runs all steps unless preempted (0: no signal).")


def main(argv):
    del argv
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax  # noqa: PLC0415

    from moco_jax.training import trainer  # noqa: PLC0415

    config = _CONFIG.value
    distributed.check_same_config(config)
    first = config.copy_and_resolve_references()
    make_real_step = trainer.make_train_step
    if _SIGTERM_AT.value:
        trainer.make_train_step = _signalling_step(make_real_step, _SIGTERM_AT.value, jax.process_index() == 1)
    else:
        first.num_train_steps = _FIRST_STEPS.value
    part1 = trainer.train_and_evaluate(first, _WORKDIR.value, show_progress=False)
    trainer.make_train_step = make_real_step
    part2 = trainer.train_and_evaluate(config, _WORKDIR.value, show_progress=False)

    pid = jax.process_index()
    state = part2["state"]
    leaves = {f"params/{jax.tree_util.keystr(path)}": np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    np.savez(os.path.join(_OUT.value, f"process_{pid}.npz"), queue=np.asarray(state.queue),
             queue_ptr=np.asarray(state.queue_ptr), step=np.asarray(state.step), **leaves)
    record = {
        "process_index": pid,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "history": [{"step": h["step"], "loss": h["loss"]} for h in part1["history"] + part2["history"]],
        "resumed_steps": [h["step"] for h in part2["history"]],
        "preempted": part1["preempted"],
    }
    with open(os.path.join(_OUT.value, f"process_{pid}.json"), "w") as f:
        json.dump(record, f)


def _signalling_step(make_real_step, at_step: int, signal_here: bool):
    """make_train_step whose step sends this process SIGTERM after
    dispatching step `at_step` (a real signal, caught by JAX's handler)."""
    import signal  # noqa: PLC0415

    def make(*args):
        real = make_real_step(*args)

        def step(p_state, batch):
            out = real(p_state, batch)
            if signal_here and int(out[0].step.addressable_shards[0].data[0]) == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return step

    return make


if __name__ == "__main__":
    app.run(main)

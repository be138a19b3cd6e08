"""Pretrain an encoder with MoCo (`python train.py` in the repository, or
`python -m moco_jax.train` from anywhere once the package is installed).

  python train.py --workdir runs/default              # configs/default.py
  python train.py --config configs/moco_v2_cifar10.py --workdir runs/cifar10
  python train.py --workdir runs/r18 --config.batch_size=256 --config.model.depth=18

`python -m moco_jax.config_fields --config FILE` lists a config's fields.
Relaunching the same command resumes from the workdir's newest checkpoint; a
finished run says so and changes nothing.

Several processes (multi-host; see docs/multi_host.md and
scripts/): every process runs the same command. Under SLURM (`srun`), Open
MPI (`mpirun`) and on Cloud TPU VMs the processes find each other by
themselves; elsewhere give each process the coordinator (process 0's
host:port), the process count and its id:

  python train.py --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 ...
  (or $MOCO_COORDINATOR_ADDRESS, $MOCO_NUM_PROCESSES, $MOCO_PROCESS_ID)
"""

import os
import sys

from moco_jax.training import preemption

preemption.exit_on_signal()  # from the first line on: SIGTERM / SIGINT end the start-up in one line
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (tf.data, TensorBoard) start-up chatter

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from moco_jax.core import config as config_lib  # noqa: E402
from moco_jax.launch import cli, compilation_cache, distributed, summary  # noqa: E402
from moco_jax.training import checks, trainer  # noqa: E402

_DEFAULT_CONFIG = os.path.join(cli.REPO_ROOT, "configs", "default.py")
_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics and checkpoints are written (shared by all processes).")
_FRESH_START = flags.DEFINE_bool(
    "fresh_start", False,
    "Start again from step 0 in a workdir whose checkpoints are all unusable (damaged ones are set aside); "
    "without it such a relaunch refuses. A usable checkpoint is always resumed from.",
)
_TAKE_OVER = flags.DEFINE_bool(
    "take_over", False,
    "Take the workdir from a run that still holds its lock (that run stops without saving); a lock left by a "
    "dead run is taken over without this flag.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, f"host:port of process 0, for a multi-process run (or ${distributed.ENV_COORDINATOR_ADDRESS})."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Processes in a multi-process run (or ${distributed.ENV_NUM_PROCESSES})."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, f"This process's index in [0, num_processes) (or ${distributed.ENV_PROCESS_ID})."
)
_COMPILATION_CACHE = compilation_cache.define_flag()
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None,
    f"Comma-separated ids of the local devices this process drives (or ${distributed.ENV_LOCAL_DEVICE_IDS}); "
    "default: all (one per process under SLURM / Open MPI on GPUs).",
)


def main(argv):
    del argv  # cli.run refuses extra arguments
    # First, before anything touches a device.
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICE_IDS.value)
    compilation_cache.enable(_COMPILATION_CACHE.value)  # before anything compiles
    is_main = jax.process_index() == 0
    if not is_main:
        logging.set_verbosity(logging.WARNING)  # one process reports; the others only warn
    distributed.check_same_config(_CONFIG.value)
    config, workdir = config_lib.with_absolute_paths(_CONFIG.value), _WORKDIR.value
    checks.check_overrides(config, cli.config_overrides(sys.argv, "config"))
    workdir = os.path.abspath(workdir) if workdir else None
    try:
        result = trainer.train_and_evaluate(config, workdir, show_progress=is_main,
                                            fresh_start=_FRESH_START.value, take_over=_TAKE_OVER.value)
    except preemption.Interrupted as e:
        return _interrupted(e)
    if result["preempted"]:
        return _stopped(result)
    if is_main:
        print(summary.final_summary(config, workdir, result))


def _say(line: str, error: bool = False) -> None:
    """One line, from process 0 only."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr if error else sys.stdout, flush=True)


def _stopped(result: dict) -> int:
    """A signal stopped the run after its step was saved (or, without a
    workdir, not): one line, and the exit status (0 after a SIGTERM with the
    step saved, so that a scheduler's requeue, or the user, simply relaunches
    the same command)."""
    name, step, workdir = preemption.signal_name(result["signal"]), result["preempted"], _WORKDIR.value
    if not workdir:
        _say(f"stopped by {name} after step {step}; nothing was saved (no --workdir)", error=True)
    elif result["phase"] == "final evaluation":
        _say(f"stopped by {name} during the final evaluation: training is complete and checkpoint {step} is saved "
             f"in {workdir}; relaunch the same command to evaluate it")
    else:
        _say(f"stopped by {name} after step {step}: checkpoint {step} is saved in {workdir}; relaunch the same "
             "command to resume")
    return preemption.exit_status(result["signal"], saved=bool(workdir))


def _interrupted(error: preemption.Interrupted) -> int:
    """A signal during start-up (nothing trained yet), or a second SIGINT."""
    workdir = _WORKDIR.value
    if isinstance(error, preemption.Aborted):
        _say(f"aborted by a second SIGINT during {error.phase}: the steps since the last checkpoint are not saved"
             + (f"; relaunch the same command to resume from {workdir}" if workdir else ""), error=True)
        return preemption.exit_status(error.signum, saved=False)
    kept = (f"the checkpoints in {workdir} are as they were; relaunch the same command to resume" if workdir
            else "nothing was saved (no --workdir)")
    _say(f"stopped by {preemption.signal_name(error.signum)} during {error.phase}: nothing was trained; {kept}",
         error=not workdir)
    return preemption.exit_status(error.signum, saved=bool(workdir))


if __name__ == "__main__":
    cli.run(main)

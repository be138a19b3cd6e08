"""Runs train.py with its command-line flags, paused at one point of the run
until a signal arrives, for the signal tests (tests/test_signals.py):

    MOCO_TEST_PAUSE=step:3   python tests/signal_worker.py --workdir W ...  # before step 3 trains
    MOCO_TEST_PAUSE=startup  ...   # in start-up, with the workdir's lock held
    MOCO_TEST_PAUSE=save     ...   # after the last step, before waiting for its asynchronous save
    MOCO_TEST_PAUSE=final    ...   # in the final kNN evaluation

It prints "paused <where>" on stdout when it gets there, then waits (at most
two minutes) until the run has received a signal; a signal during start-up or
the final evaluation interrupts the wait itself. With MOCO_TEST_PAUSE_AFTER=S
it waits S seconds more after the first signal (to receive repeated ones).
With MOCO_TEST_GO_ON_FILE=F the pause also ends when the file F appears.
"""

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT]
sys.argv[0] = os.path.join(_ROOT, "train.py")

import train  # noqa: E402 - installs the start-up signal handlers first, like the real program

from moco_jax.io import saver  # noqa: E402
from moco_jax.launch import cli  # noqa: E402
from moco_jax.training import preemption, trainer  # noqa: E402

PAUSE = os.environ.get("MOCO_TEST_PAUSE", "")
AFTER = float(os.environ.get("MOCO_TEST_PAUSE_AFTER", "0"))
GO_ON = os.environ.get("MOCO_TEST_GO_ON_FILE", "/nonexistent")  # its creation also ends the pause
RUNS: list[preemption.RunSignals] = []


def _wait_for_signal(where: str) -> None:
    print(f"paused {where}", flush=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (RUNS and RUNS[-1].received) and not os.path.exists(GO_ON):
        time.sleep(0.02)
    time.sleep(AFTER)


_real_init = preemption.RunSignals.__init__


def _recording_init(self, *args, **kwargs):
    _real_init(self, *args, **kwargs)
    RUNS.append(self)


preemption.RunSignals.__init__ = _recording_init

if PAUSE.startswith("step:"):
    at, make_real_step = int(PAUSE.split(":")[1]), trainer.make_train_step

    def _make_pausing_step(*args):
        real = make_real_step(*args)

        def step(p_state, batch):
            if int(p_state.step.addressable_shards[0].data[0]) + 1 == at:
                _wait_for_signal(f"before step {at}")
            return real(p_state, batch)

        return step

    trainer.make_train_step = _make_pausing_step

elif PAUSE in ("startup", "final"):
    real_monitor = trainer.knn_monitor

    def _pausing_monitor(*args):
        knn_fn = real_monitor(*args)

        def monitor(variables):
            phase = RUNS[-1].current if RUNS else ""
            if (PAUSE == "startup") == phase.startswith("start-up"):
                _wait_for_signal(phase)
            return knn_fn(variables)

        return monitor

    trainer.knn_monitor = _pausing_monitor

elif PAUSE == "save":
    real_finish = saver.CheckpointWriter.finish

    def _pausing_finish(self):
        if self._pending is not None:
            _wait_for_signal(f"with checkpoint {self._pending} in flight")
        return real_finish(self)

    saver.CheckpointWriter.finish = _pausing_finish

if __name__ == "__main__":
    cli.run(train.main)

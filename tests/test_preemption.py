"""SIGTERM (a preempted TPU VM, SLURM's --signal, Kubernetes eviction):
save at the next step boundary, exit 0, and resume exactly on relaunch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from moco_jax.training import metrics, trainer
from test_checkpoint import _assert_states_equal, _latest
from test_workdir_lock import TINY_FLAGS
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
# A constant learning rate ("step" drops only at epoch 120), so that the
# schedule does not depend on the run's length: the interrupted run, its
# relaunch and the reference follow the same one.
RECIPE = dict(lr_schedule="step", log_every_steps=1, checkpoint_every_steps=1000)


def _logged_steps(workdir: Path) -> list[int]:
    try:
        lines = (workdir / metrics.JSONL_NAME).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def _train_py(workdir, num_steps):
    flags = TINY_FLAGS + [f"--config.{k}={v}" for k, v in RECIPE.items()] + [f"--config.num_train_steps={num_steps}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes_exactly(tmp_path):
    workdir = tmp_path / "run"
    proc = _train_py(workdir, num_steps=10_000)  # far more than it will get to train
    deadline = time.time() + TIMEOUT
    while not _logged_steps(workdir) or max(_logged_steps(workdir)) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training never reached step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    stopped = int(out.strip().splitlines()[-1].split("after step ")[1].split(":")[0])
    assert out.strip().splitlines()[-1] == (f"stopped by SIGTERM after step {stopped}: checkpoint {stopped} is saved "
                                            f"in {workdir}; relaunch the same command to resume")
    assert stopped >= 2 and max(_logged_steps(workdir)) == stopped
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped)]  # no periodic save was due
    assert not (workdir / "LOCK").exists() and not (workdir / metrics.FINAL_NAME).exists()

    # Relaunched (here in this process, for 2 more steps), it continues from
    # the saved step, bit for bit like a run that was never interrupted.
    total = stopped + 2
    config = tiny_config(**RECIPE, num_train_steps=total)
    trainer.train_and_evaluate(config, workdir=str(workdir), show_progress=False)
    reference = trainer.train_and_evaluate(config, workdir=str(tmp_path / "reference"), show_progress=False)
    resumed = _latest(workdir, config)
    assert int(resumed.step) == total
    _assert_states_equal(resumed, _latest(tmp_path / "reference", config))
    logged = {r["step"]: r["loss"] for r in metrics.read_jsonl(str(workdir)) if "loss" in r}
    for record in reference["history"]:
        assert logged[record["step"]] == record["loss"], record["step"]


def test_sigterm_without_a_workdir_says_nothing_was_saved(tmp_path):
    """In-process: the handler is installed for the run and removed after."""
    config = tiny_config(**RECIPE, num_train_steps=50)
    make_real_step = trainer.make_train_step

    def make_step_that_is_preempted(*args):
        real = make_real_step(*args)

        def step(p_state, batch):
            if int(p_state.step.addressable_shards[0].data[0]) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 runs
            return real(p_state, batch)

        return step

    before = signal.getsignal(signal.SIGTERM)
    trainer.make_train_step = make_step_that_is_preempted
    try:
        result = trainer.train_and_evaluate(config, workdir=None, show_progress=False)
    finally:
        trainer.make_train_step = make_real_step
    assert result["preempted"] == 3 and int(result["state"].step) == 3
    assert "knn_trained" not in result
    assert signal.getsignal(signal.SIGTERM) is before
    assert np.all(np.isfinite(jax.tree.leaves(result["state"].params)[0]))

"""Multi-host on one machine: two processes on 127.0.0.1, 4 emulated CPU
devices each (gloo collectives), against one process with 8 devices.

Each process is a subprocess with a timeout: a hung or missing peer fails the
test instead of hanging it.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moco_jax.launch import distributed
from moco_jax.training import trainer
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 420  # per launch; a healthy one takes well under a minute on an idle 2-core machine

# 8 images per device: the BN statistics of a batch of 2 per device (tiny.py's
# default) amplify float rounding differences chaotically, step after step.
# A constant learning rate ("step" drops only at epoch 120): the first,
# 3-step run then follows the same schedule as the 5-step reference.
CONFIG = dict(batch_size=64, queue_size=128, num_train_steps=5, log_every_steps=1, knn_k=20, lr_schedule="step")
CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from tiny import tiny_config

def get_config():
    return tiny_config(**{config!r})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    env = os.environ.copy()
    # 4 devices per process (conftest.py asked for 8 in this process), and
    # collectives that wait for a slow peer on a loaded machine instead of
    # timing out after XLA's default 30 s (the launch timeout still applies).
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=300"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _start(commands: list[list[str]], log_dir: Path) -> list[subprocess.Popen]:
    """One subprocess per command, output to log_dir/process_<i>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, command in enumerate(commands):
        with open(log_dir / f"process_{i}.log", "w") as log:
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env()))
    return procs


def _wait(procs: list[subprocess.Popen], log_dir: Path, started: float) -> list[int]:
    """The exit codes; kills all and fails the test if they are not done
    within TIMEOUT_S of `started` (a hung or missing peer)."""
    try:
        for p in procs:
            p.wait(timeout=max(1.0, started + TIMEOUT_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        pytest.fail(f"a process did not finish within {TIMEOUT_S} s:\n" + _tails(log_dir, len(procs)))
    return [p.returncode for p in procs]


def _tails(log_dir: Path, n: int, chars: int = 3000) -> str:
    return "\n".join(f"--- process {i}:\n{(log_dir / f'process_{i}.log').read_text()[-chars:]}" for i in range(n))


def _write_config(tmp_path: Path, config: dict = CONFIG) -> Path:
    path = tmp_path / "tiny_multiprocess.py"
    path.write_text(CONFIG_FILE.format(tests=str(TESTS), config=config))
    return path


# The SIGTERM reaches process 0 through JAX's coordination service some
# 100 ms after process 1 got it; the run must still have steps left by then.
SIGTERM_CONFIG = {**CONFIG, "num_train_steps": 12}


@pytest.mark.slow
def test_two_processes_preempted_by_sigterm_resume_like_one_process_with_8_devices(tmp_path):
    """Process 1 alone receives SIGTERM at step 2; JAX's preemption service
    makes both stop at the same step, which they save together; the relaunch
    resumes from it, and every logged loss and the final state match one
    uninterrupted process with 8 devices."""
    config_file, workdir, out = _write_config(tmp_path, SIGTERM_CONFIG), tmp_path / "workdir", tmp_path / "out"
    total = SIGTERM_CONFIG["num_train_steps"]
    out.mkdir()
    port = _free_port()
    commands = [
        [sys.executable, str(TESTS / "multiprocess_worker.py"), f"--config={config_file}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         f"--workdir={workdir}", f"--out={out}", "--sigterm_at_step=2"]
        for i in range(2)
    ]
    started = time.monotonic()
    procs = _start(commands, tmp_path / "logs")
    try:
        # The reference, computed while the two processes run: this process,
        # 8 devices, all steps in one go, the same data order.
        reference = trainer.train_and_evaluate(tiny_config(**SIGTERM_CONFIG), workdir=None, show_progress=False)
    finally:
        codes = _wait(procs, tmp_path / "logs", started)
    assert codes == [0, 0], _tails(tmp_path / "logs", 2)
    ref_losses = [h["loss"] for h in reference["history"]]

    records = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
    stopped = records[0]["preempted"]
    assert 2 <= stopped < total and records[1]["preempted"] == stopped, "both processes stop at the agreed step"
    for i, record in enumerate(records):
        assert (record["process_index"], record["process_count"]) == (i, 2)
        assert (record["device_count"], record["local_device_count"]) == (8, 4)
        assert [h["step"] for h in record["history"]] == list(range(1, total + 1))
        assert record["resumed_steps"] == list(range(stopped + 1, total + 1)), "the relaunch resumes from there"
    saved = sorted((p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()), key=int)
    assert saved == [str(stopped), str(total)]

    # Not bit-exact: gloo sums the cross-process reductions in another order
    # than the in-process all-reduce (differences of ~1e-7 relative).
    losses = [h["loss"] for h in records[0]["history"]]
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, atol=0)
    assert len(set(np.round(ref_losses, 4))) == total, "the losses must differ for the comparison to mean anything"

    # Every process holds the whole queue and the same parameters (from_devices
    # gathers across processes), equal to the single-process state.
    states = [np.load(out / f"process_{i}.npz") for i in range(2)]
    for name in states[0].files:
        np.testing.assert_array_equal(states[0][name], states[1][name], err_msg=name)
    ref = reference["state"]
    assert int(states[0]["step"]) == total and int(states[0]["queue_ptr"]) == int(ref.queue_ptr)
    np.testing.assert_allclose(states[0]["queue"], np.asarray(ref.queue), atol=1e-5)
    import jax  # noqa: PLC0415

    # The reduction-order differences grow over the SGD steps: seen up to 1.04e-5 (one BN parameter of 0.06).
    for path, leaf in jax.tree_util.tree_leaves_with_path(ref.params):
        np.testing.assert_allclose(states[0][f"params/{jax.tree_util.keystr(path)}"], np.asarray(leaf), atol=5e-5)


def test_processes_started_with_different_configs_stop_with_a_clear_error(tmp_path):
    config_file = _write_config(tmp_path)
    port = _free_port()
    commands = [
        [sys.executable, str(REPO / "train.py"), f"--config={config_file}", f"--workdir={tmp_path / 'w'}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         f"--config.learning_rate={lr}"]
        for i, lr in enumerate((0.06, 0.6))
    ]
    codes = _wait(_start(commands, tmp_path / "logs"), tmp_path / "logs", time.monotonic())
    logs = _tails(tmp_path / "logs", 2, chars=20000)
    assert codes[0] != 0 and codes[1] != 0, logs
    for i in range(2):
        text = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert "different configs" in text and "learning_rate=0.6 (process 0: 0.06)" in text, text[-3000:]
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


# ----------------------------------------------------------- start-up logic
SRUN_2_TASKS = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}


def test_clusters_jax_can_read_the_layout_from_are_detected():
    assert distributed.detected_cluster({}) is None
    assert distributed.detected_cluster(SRUN_2_TASKS) == "slurm"
    assert distributed.detected_cluster({**SRUN_2_TASKS, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) is None  # salloc, not srun
    assert distributed.detected_cluster({"OMPI_MCA_orte_hnp_uri": "1.2:tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"


def test_explicit_settings_come_from_flags_first_then_the_environment():
    env = {"MOCO_COORDINATOR_ADDRESS": "10.0.0.1:1234", "MOCO_NUM_PROCESSES": "4", "MOCO_PROCESS_ID": "3",
           "MOCO_LOCAL_DEVICE_IDS": "0,1"}
    assert distributed.explicit_settings(environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3, "local_device_ids": [0, 1]}
    assert distributed.explicit_settings(process_id=0, environ=env)["process_id"] == 0
    assert distributed.explicit_settings(environ={}) is None  # a plain single-process run
    with pytest.raises(ValueError, match="process_id missing"):
        distributed.explicit_settings("10.0.0.1:1234", 2, environ={})
    with pytest.raises(ValueError, match=r"process_id=2 must lie in \[0, num_processes=2\)"):
        distributed.explicit_settings("10.0.0.1:1234", 2, 2, environ={})
    # One process, or nothing given: no distributed runtime (and no error).
    assert not distributed.maybe_initialize("10.0.0.1:1234", 1, 0, environ={})
    assert not distributed.maybe_initialize(environ={})


def test_config_differences_name_the_fields():
    base = {"learning_rate": 0.06, "model": {"width": 16}}
    assert distributed.config_differences([base, base]) == []
    other = {"learning_rate": 0.6, "model": {"width": 8}}
    assert distributed.config_differences([base, base, other]) == [
        "process 2: learning_rate=0.6 (process 0: 0.06)", "process 2: model.width=8 (process 0: 16)"]


# ------------------------------------------------- the workdir lock, SIGTERM
def _train_py_commands(config_file, workdir, port, *flags):
    return [[sys.executable, str(REPO / "train.py"), f"--config={config_file}", f"--workdir={workdir}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *flags]
            for i in range(2)]


def test_every_process_refuses_a_workdir_held_by_another_run(tmp_path):
    """Process 0 finds the lock held; all processes stop with its one line."""
    from moco_jax.io import lock as lock_lib  # noqa: PLC0415

    workdir = tmp_path / "w"
    holder = lock_lib.WorkdirLock(str(workdir))
    holder.acquire()
    try:
        commands = _train_py_commands(_write_config(tmp_path), workdir, _free_port())
        codes = _wait(_start(commands, tmp_path / "logs"), tmp_path / "logs", time.monotonic())
    finally:
        holder.release()
    assert codes == [1, 1], _tails(tmp_path / "logs", 2)
    for i in range(2):
        text = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert "Traceback" not in text, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]  # gloo may print after it
        assert len(errors) == 1, text[-3000:]
        last = errors[0]
        assert last.startswith(f"error: workdir {workdir} is in use by a run on host ") and f"(pid {os.getpid()}," in last
    assert not (workdir / "metrics.jsonl").exists()

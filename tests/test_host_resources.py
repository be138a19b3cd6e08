"""What the input pipeline may use of its host (moco_jax/data/host_resources.py):
the CPUs this process owns (affinity, cgroup quota, SLURM_CPUS_PER_TASK, the
host's other training processes) as the default worker and thread counts,
and grain's worker processes sized to the free /dev/shm.

Each test sees a host it describes: `host` stubs os.cpu_count and
os.sched_getaffinity, points the cgroup files at a temporary folder and
clears the launcher's variables; `shm` stubs the free space of a stand-in
for /dev/shm.
"""
import itertools
import logging
import os
import types

import numpy as np
import pytest
from PIL import Image

from moco_jax.data import host_resources as hr
from moco_jax.data.pipelines import grain
from moco_jax.data.source import SourceConfig
from moco_jax.data.sources import image_folder
from image_files import colour

LAUNCHER_VARS = ("SLURM_CPUS_PER_TASK", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "SLURM_STEP_NUM_NODES", "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE",
                 "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_MCA_orte_hnp_uri", "LOCAL_WORLD_SIZE",
                 "MOCO_COORDINATOR_ADDRESS", "MOCO_NUM_PROCESSES")


@pytest.fixture
def host(tmp_path, monkeypatch):
    """set(cpus, affinity): a host of `cpus` CPUs, this process bound to the
    first `affinity`; no cgroup quota (until the test writes one under
    host.cgroup) and no launcher variables."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(hr, "CGROUP_ROOT", str(cgroup))
    monkeypatch.setattr(hr, "SELF_CGROUP", str(tmp_path / "self_cgroup"))
    monkeypatch.setattr(hr, "_warned", set())

    def set_host(cpus: int, affinity: int):
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))

    set_host.cgroup = cgroup
    set_host.self_cgroup = tmp_path / "self_cgroup"
    set_host(16, 16)
    return set_host


def slurm_step(monkeypatch, ntasks: int, tasks_per_node: str, node: int = 0):
    """The variables `srun` sets for a job step of `ntasks` tasks."""
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": ntasks,
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2",
                        "SLURM_NODEID": node, "SLURM_TASKS_PER_NODE": tasks_per_node}.items():
        monkeypatch.setenv(name, str(value))


# --------------------------------------------------------------------------- CPUs
def test_a_restricted_affinity_gives_fewer_default_workers(host):
    host(64, 64)
    spec = SourceConfig("folder")
    assert (spec.grain_workers, spec.grain_threads, spec.num_threads) == (63, 1, 63)
    host(64, 4)
    assert (spec.grain_workers, spec.grain_threads, spec.num_threads) == (3, 1, 3)
    host(64, 2)  # 2 CPUs: threads of the training process, not one worker
    assert (spec.grain_workers, spec.grain_threads, spec.num_threads) == (0, 2, 1)
    assert str(hr.cpu_share()) == "2 CPUs owned: affinity 2 of 64"


@pytest.mark.parametrize("cpu_max, cpus, workers", [("250000 100000\n", 3, 2), ("200000 100000", 2, 0),
                                                   ("max 100000\n", 16, 15)])
def test_cgroup_v2_quota(host, cpu_max, cpus, workers):
    (host.cgroup / "cpu.max").write_text(cpu_max)
    assert hr.cpus_owned() == cpus
    assert SourceConfig("folder").grain_workers == workers


def test_cgroup_v1_quota_of_this_process_or_an_ancestor(host):
    (host.cgroup / "cpu").mkdir()
    (host.cgroup / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (host.cgroup / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert hr.cgroup_cpu_quota(str(host.cgroup), str(host.self_cgroup)) is None and hr.cpus_owned() == 16
    job = host.cgroup / "cpu,cpuacct" / "job_7"
    (job / "step_0").mkdir(parents=True)
    (job / "cpu.cfs_quota_us").write_text("400000\n")
    (job / "cpu.cfs_period_us").write_text("100000\n")
    host.self_cgroup.write_text("5:memory:/job_7\n4:cpu,cpuacct:/job_7/step_0\n")
    assert hr.cgroup_cpu_quota(str(host.cgroup), str(host.self_cgroup)) == 4.0
    share = hr.cpu_share()
    assert (share.cpus, SourceConfig("folder").grain_workers) == (4, 3)
    assert str(share) == "4 CPUs owned: affinity 16, cgroup quota 4"


def test_slurm_cpus_per_task(host, monkeypatch):
    host(192, 192)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    spec = SourceConfig("folder")
    assert (spec.grain_workers, spec.grain_threads, spec.num_threads) == (7, 1, 7)
    assert hr.describe_parallelism("grain", spec) == (
        "grain (7 worker processes x 1 thread; 8 CPUs owned: affinity 192, SLURM_CPUS_PER_TASK 8)")


def test_the_cpus_are_shared_among_the_training_processes_of_the_host(host, monkeypatch):
    slurm_step(monkeypatch, 16, "8(x2)", node=1)  # scripts/launch_slurm.sbatch without --cpus-per-task
    host(192, 192)  # every task sees the whole machine: 192 / 8 each
    assert hr.local_training_processes(os.environ) == (8, "SLURM_TASKS_PER_NODE")
    share = hr.cpu_share()
    assert (share.cpus, SourceConfig("folder").grain_workers) == (24, 23)
    assert str(share) == "24 CPUs owned: affinity 192 / 8 training processes on this host ($SLURM_TASKS_PER_NODE)"
    host(192, 64)  # one job-wide cpuset: 8 masks of 64 CPUs cannot be disjoint on 192
    assert hr.cpus_owned() == 8
    host(192, 8)  # SLURM bound each task to its own 8 CPUs: not divided again
    assert hr.cpus_owned() == 8 and "each with its own CPUs" in str(hr.cpu_share())
    host(192, 192)  # a container's quota is shared too
    (host.cgroup / "cpu.max").write_text("1600000 100000\n")
    assert hr.cpus_owned() == 2


@pytest.mark.parametrize("env, processes", [
    ({"LOCAL_WORLD_SIZE": "4"}, 4),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),
    ({"MOCO_COORDINATOR_ADDRESS": "localhost:1234", "MOCO_NUM_PROCESSES": "4"}, 4),
    ({"MOCO_COORDINATOR_ADDRESS": "node-1:1234", "MOCO_NUM_PROCESSES": "4"}, 1),  # other hosts too: unknown
    ({"SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "8"}, 1),  # the batch script, not an srun step
    ({}, 1),
])
def test_local_training_processes(env, processes):
    assert hr.local_training_processes(env)[0] == processes


def test_slurm_tasks_per_node():
    assert [hr.slurm_tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert hr.slurm_tasks_on_node("8", 0) == 8 and hr.slurm_tasks_on_node("8(x2)", 5) == 8
    assert hr.slurm_tasks_on_node("", 0) == 0 and hr.slurm_tasks_on_node("(null)", 0) == 0


def test_explicit_workers_and_threads_win(host, monkeypatch):
    host(64, 2)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    spec = SourceConfig("folder", input_workers=5, input_threads=3)
    assert (spec.grain_workers, spec.grain_threads, spec.num_threads) == (5, 3, 3)
    assert SourceConfig("folder", input_workers=0).grain_workers == 0
    assert hr.describe_parallelism("tf", spec) == (
        "tf.data (3 threads; input_threads=3; 1 CPUs owned: affinity 2 of 64, SLURM_CPUS_PER_TASK 1)")


# --------------------------------------------------------------------------- shared memory
@pytest.fixture
def shm(tmp_path, monkeypatch):
    """set(free_bytes) -> the path of a stand-in for /dev/shm that has
    `free_bytes` free (os.statvfs stubbed for it alone)."""
    path = str(tmp_path / "shm")
    statvfs = os.statvfs
    free = {}
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=free["bytes"], f_frsize=1)
                        if str(p) == path else statvfs(p))
    monkeypatch.setattr(hr, "_warned", set())

    def set_free(n: int) -> str:
        free["bytes"] = n
        return path

    return set_free


MB = 2**20


def test_shm_in_flight_and_plan():
    assert hr.shm_in_flight(0, 2, 77 * MB) == 0
    assert hr.shm_in_flight(15, 2, MB) == (15 * 6 + hr.HELD_BY_CONSUMER) * MB
    assert hr.plan_shm(15, 2, MB, 10**6 * MB) == (15, 2)  # fits
    assert hr.plan_shm(15, 2, MB, 63 * MB) == (15, 1)  # 15 x 4 + 3
    assert hr.plan_shm(15, 2, MB, 40 * MB) == (9, 1)
    assert hr.plan_shm(15, 2, MB, 8 * MB) == (0, 2)  # one worker fits: threads deliver more
    assert hr.plan_shm(1, 2, MB, 8 * MB) == (1, 1)  # ... unless one was all that was asked
    assert hr.plan_shm(4, 2, MB, 6 * MB) == (0, 2)


def test_too_little_shm_means_fewer_workers_with_one_warning(shm, caplog):
    step = 256 * 2 * 224 * 224 * 3  # one step of local batch 256 at 224 px: 77 MB
    options = grain.Options(workers=15, threads=1, threads_alone=16, shm_dir=shm(8 * 2**30))
    with caplog.at_level(logging.WARNING):
        fitted = options.fitted(step)
        assert options.fitted(step) == fitted  # the same reduction again: no second warning
    assert (fitted.workers, fitted.buffer, fitted.threads) == (13, 1, 1)  # (4 GB / 73.5 MB - 3) // 4
    [warning] = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning
    assert warning == (
        "grain: 15 worker processes with 2 buffered steps of 73.5 MB each would hold up to 6.7 GB of "
        f"{options.shm_dir}, more than this process may fill (4.0 GB: half of its 8.0 GB free); running 13 worker "
        "processes with 1 buffered step each. To fix: give it 14 GB or more (docker run --shm-size=14g), or lower "
        "--config.input_workers")
    assert grain.Options(workers=15, shm_dir=shm(20 * 2**30)).fitted(step).workers == 15  # it fits: as asked


def test_no_worker_fits_in_dockers_default_shm(shm, caplog):
    step = 256 * 2 * 224 * 224 * 3
    options = grain.Options(workers=7, threads=1, threads_alone=8, host_processes=8, shm_dir=shm(64 * MB))
    with caplog.at_level(logging.WARNING):
        fitted = options.fitted(step)
    assert (fitted.workers, fitted.threads) == (0, 8)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "(4.0 MB: half of its 64.0 MB free, shared by 8 training processes of this host)" in warning
    assert "decoding in 8 threads of the training process, no worker processes (slower)" in warning
    assert "--shm-size=52g" in warning  # (7 x 6 + 3) steps x 8 processes, twice that


def test_a_shm_that_cannot_be_read_is_not_checked(tmp_path):
    options = grain.Options(workers=3, shm_dir=str(tmp_path / "none"))
    assert options.fitted(10**12) is options


# --------------------------------------------------------------------------- the pipeline itself
@pytest.mark.parametrize("free, workers", [pytest.param(80_000, 2, marks=pytest.mark.slow),  # starts 2 workers
                                           (1_000, 0)])
def test_two_crop_batches_runs_when_shm_forces_fewer_workers(tmp_path, shm, monkeypatch, caplog, free, workers):
    """Real grain workers: 3 asked, with the stand-in's free space only 2
    (buffer 1) or none fit; the batches are those without workers."""
    paths = np.asarray([str(tmp_path / f"{i:02d}.png") for i in range(16)])
    for i, path in enumerate(paths):
        Image.new("RGB", (24, 16), colour(i)).save(path)
    started = []
    parallel = grain.Options.parallel
    monkeypatch.setattr(grain.Options, "parallel", lambda self, ds: started.append(self) or parallel(self, ds))

    def stream(options):
        return list(itertools.islice(grain.two_crop_batches(
            image_folder.FileImages(paths), global_batch=8, seed=5, crop_size=8, crop_scale=(0.2, 1.0),
            options=options), 3))

    expected = stream(grain.Options(workers=0, threads=2))
    with caplog.at_level(logging.WARNING):
        got = stream(grain.Options(workers=3, threads=1, threads_alone=2, shm_dir=shm(free)))
    assert [(o.workers, o.buffer) for o in started[1:]] == [(workers, 1 if workers else 2)]
    assert len([r for r in caplog.records if "--shm-size=" in r.getMessage()]) == 1
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)

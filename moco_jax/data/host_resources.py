"""What the input pipeline of this process may use of its host: CPUs for
decode workers and threads, and shared memory (/dev/shm) for what grain's
worker processes hand over.

CPUs. `os.cpu_count()` counts every CPU of the machine, not what this
process may use: its CPU affinity (taskset, SLURM's task binding, docker
--cpuset-cpus), a cgroup CPU quota (docker --cpus, Kubernetes limits),
SLURM's --cpus-per-task, and the other training processes of the host (a
SLURM node running 8 tasks, one per GPU) all leave it less. Starting a
worker per host CPU in each of 8 processes on a 192-vCPU node would start
8 x 191 of them. `cpu_share` derives the CPUs this process owns:

  * per-process limits: SLURM_CPUS_PER_TASK, and the affinity where the
    host's training processes can have disjoint masks (N x affinity <= host
    CPUs: SLURM binds each task to its own CPUs);
  * shared limits, divided among the N training processes of the host: the
    affinity where the masks must overlap (N x affinity > host CPUs: all
    see the whole machine, or one job-wide cpuset), and the cgroup quota
    (of the container or job, ceil(quota / period) CPUs);
  * this process owns the smallest of them, at least 1.

N comes from the launcher (`local_training_processes`): a SLURM job step of
several tasks (`srun`, as moco_jax.launch.distributed detects one), Open MPI,
torchrun-style LOCAL_WORLD_SIZE, or moco_jax's own $MOCO_* settings with the
coordinator on localhost (all processes on this host); else 1 (one process
driving every local device: scripts/launch_multi_gpu_host.sh).

Shared memory. A grain worker process hands each element over in /dev/shm
(grain 0.2.18 copies every numpy array of it into a SharedMemory block,
`grain.experimental.DatasetOptions.min_shm_size` being 0), and one
training element is a chunk of at most 32 images of a step (`grain._Steps`):
uint8 (32, 2, S, S, 3), 9.6 MB at S = 224, whatever the batch size (an
evaluation element is still a whole step). Per worker, with grain's per_worker_buffer_size
B, up to 2B + 2 elements are in /dev/shm at once (measured: B in the
worker's queue, one more waiting to enter it, B in the training process's
prefetch thread of that worker and one more waiting there), and the
training loop holds a few steps more. Docker's default /dev/shm is 64 MB:
without a check the workers die with an obscure error. `fit_shm` sizes the
workers to half the free /dev/shm shared among the host's training
processes: fewer buffered elements, then fewer workers, else none (threads
of the training process decode), with one warning saying what it reduced
and how to give the container more.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping, Optional

from absl import logging

CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"
SHM_DIR = "/dev/shm"
SHM_SHARE = 0.5  # of the free /dev/shm, what the workers of all training processes of a host may fill
HELD_BY_CONSUMER = 3  # elements the training loop holds: the step in use, prefetch_to_device's 2 ahead
# What a SLURM job step (`srun`) sets; moco_jax.launch.distributed (which the
# data layer cannot import) starts multi-process training on the same ones.
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                    "SLURM_STEP_NUM_NODES")
_LOCALHOST = ("localhost", "127.0.0.1", "::1")
_warned: set = set()


# --------------------------------------------------------------------------
# CPUs
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CpuShare:
    """The CPUs this process owns (`cpus`) and what they were derived from.

    host: os.cpu_count(); affinity: CPUs of this process's affinity mask;
    quota: the cgroup CPU quota in CPUs (None: none); slurm: SLURM_CPUS_PER_TASK
    (None: not set); processes: training processes on this host, read from
    `processes_from` (an environment variable; '' when 1 by default);
    divided: whether the affinity was shared among them.
    """

    cpus: int
    host: int
    affinity: int
    quota: Optional[float] = None
    slurm: Optional[int] = None
    processes: int = 1
    processes_from: str = ""
    divided: bool = False

    def __str__(self) -> str:
        """e.g. '8 CPUs owned: affinity 64 of 192, SLURM_CPUS_PER_TASK 8'."""
        among = f" / {self.processes} training processes on this host (${self.processes_from})"
        affinity = f"affinity {self.affinity}" + (f" of {self.host}" if self.affinity < self.host else "")
        parts = [affinity + (among if self.divided else "")]
        if self.quota is not None:
            parts.append(f"cgroup quota {self.quota:g}" + (among if self.processes > 1 else ""))
        if self.slurm is not None:
            parts.append(f"SLURM_CPUS_PER_TASK {self.slurm}")
        if self.processes > 1 and not self.divided and self.quota is None:
            parts.append(f"{self.processes} training processes on this host (${self.processes_from}), "
                         "each with its own CPUs")
        return f"{self.cpus} CPUs owned: " + ", ".join(parts)


def share_cpus(host: int, affinity: int, quota: Optional[float] = None, slurm: Optional[int] = None,
               processes: int = 1) -> tuple[int, bool]:
    """(CPUs this process owns, whether the affinity was divided) by the rule
    of the module docstring. quota in CPUs (quota / period), None: none."""
    divided = processes > 1 and affinity * processes > host
    limits = [affinity // processes if divided else affinity]
    if quota is not None:
        limits.append(math.ceil(quota) // processes)
    if slurm is not None:
        limits.append(slurm)
    return max(1, min(limits)), divided


def cpu_share(environ: Optional[Mapping[str, str]] = None, cgroup_root: str = "", self_cgroup: str = "") -> CpuShare:
    """The CPUs this process owns, read from the process (affinity), its
    cgroups (cgroup_root, self_cgroup: '' for CGROUP_ROOT and SELF_CGROUP,
    read at call time, so that tests can point them elsewhere) and the
    environment (SLURM_CPUS_PER_TASK, the launcher's process layout)."""
    environ = os.environ if environ is None else environ
    cgroup_root, self_cgroup = cgroup_root or CGROUP_ROOT, self_cgroup or SELF_CGROUP
    host = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = host
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    slurm = _positive_int(environ.get("SLURM_CPUS_PER_TASK"))
    processes, source = local_training_processes(environ)
    cpus, divided = share_cpus(host, affinity, quota, slurm, processes)
    return CpuShare(cpus, host, affinity, quota, slurm, processes, source, divided)


def cpus_owned(environ: Optional[Mapping[str, str]] = None) -> int:
    """The CPUs this process may keep busy: `cpu_share(environ).cpus`."""
    return cpu_share(environ).cpus


def cgroup_cpu_quota(root: str = CGROUP_ROOT, self_cgroup: str = SELF_CGROUP) -> Optional[float]:
    """The tightest CPU quota of this process's cgroups, in CPUs (quota /
    period, e.g. 2.5), or None when none is set ('max', -1) or readable.
    cgroup v2: `cpu.max` ("quota period"); v1: `cpu.cfs_quota_us` and
    `cpu.cfs_period_us`; in this process's cgroup and each ancestor."""
    quotas = [q for q in map(_dir_quota, _cgroup_dirs(root, self_cgroup)) if q is not None]
    return min(quotas) if quotas else None


def _cgroup_dirs(root: str, self_cgroup: str) -> list[str]:
    """The cgroup directories whose CPU quota bounds this process: its cgroup
    and its ancestors in each hierarchy with the cpu controller (v2: `root`;
    v1: root/cpu, root/cpu,cpuacct), the roots included (in a container the
    process's own cgroup is the root)."""
    dirs = [root, os.path.join(root, "cpu"), os.path.join(root, "cpu,cpuacct")]
    for line in _read(self_cgroup).splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            bases = [root]
        elif "cpu" in controllers.split(","):
            bases = [os.path.join(root, controllers), os.path.join(root, "cpu")]
        else:
            continue
        parts = [p for p in path.split("/") if p]
        dirs += [os.path.join(base, *parts[:k]) for base in bases for k in range(len(parts), 0, -1)]
    return list(dict.fromkeys(dirs))


def _dir_quota(directory: str) -> Optional[float]:
    """The CPU quota of one cgroup directory in CPUs, None if unlimited."""
    fields = _read(os.path.join(directory, "cpu.max")).split()
    if fields:
        quota, period = (fields + ["100000"])[:2]
    else:
        quota = _read(os.path.join(directory, "cpu.cfs_quota_us")).strip()
        period = _read(os.path.join(directory, "cpu.cfs_period_us")).strip()
    q, p = _positive_int(quota), _positive_int(period)
    return q / p if q and p else None


def local_training_processes(environ: Mapping[str, str]) -> tuple[int, str]:
    """(training processes on this host, the variable it was read from);
    (1, '') when the launcher says nothing. Read from: a SLURM job step of
    several tasks (SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE or
    SLURM_NTASKS_PER_NODE, at this node's SLURM_NODEID), Open MPI
    (OMPI_COMM_WORLD_LOCAL_SIZE), LOCAL_WORLD_SIZE (torchrun-style launchers),
    or $MOCO_NUM_PROCESSES when $MOCO_COORDINATOR_ADDRESS is on localhost
    (every process on this host, scripts/launch_multi_gpu_host.sh's one
    process per GPU)."""
    if all(v in environ for v in _SLURM_STEP_VARS) and (_positive_int(environ.get("SLURM_NTASKS")) or 0) > 1:
        node = _positive_int(environ.get("SLURM_NODEID"), zero=True) or 0
        for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
            count = slurm_tasks_on_node(environ.get(name, ""), node)
            if count:
                return count, name
    if (_positive_int(environ.get("OMPI_COMM_WORLD_SIZE")) or 0) > 1:
        count = _positive_int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE"))
        if count:
            return count, "OMPI_COMM_WORLD_LOCAL_SIZE"
    count = _positive_int(environ.get("LOCAL_WORLD_SIZE"))
    if count:
        return count, "LOCAL_WORLD_SIZE"
    host = environ.get("MOCO_COORDINATOR_ADDRESS", "").rsplit(":", 1)[0].strip("[]")
    count = _positive_int(environ.get("MOCO_NUM_PROCESSES"))
    if host in _LOCALHOST and count:
        return count, "MOCO_NUM_PROCESSES"
    return 1, ""


def slurm_tasks_on_node(value: str, node: int) -> int:
    """Tasks on node `node` from SLURM's compressed per-node counts, e.g.
    '8(x2)' (8 on each of 2 nodes) or '2,1'; 0 if unreadable."""
    counts = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            return 0
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node] if node < len(counts) else max(counts, default=0)


def _positive_int(value, zero: bool = False) -> Optional[int]:
    """int(value) if it is > 0 (>= 0 with `zero`), else None."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 or (zero and number == 0) else None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def describe_parallelism(loader: str, spec) -> str:
    """For the start-up log: which pipeline decodes, with how many worker
    processes and threads, and where those counts come from, e.g. 'grain (7
    worker processes x 1 thread; 8 CPUs owned: affinity 64 of 192,
    SLURM_CPUS_PER_TASK 8)'. loader: 'grain' or 'tf'; spec: a
    `source.SourceConfig`."""
    why = [f"input_threads={spec.input_threads}"] if spec.input_threads else []
    if loader == "tf":
        counts = _plural(spec.num_threads, "thread")
    else:
        if spec.input_workers >= 0:
            why.insert(0, f"input_workers={spec.input_workers}")
        workers, threads = spec.grain_workers, _plural(spec.grain_threads, "thread")
        counts = (f"{_plural(workers, 'worker process', 'worker processes')} x {threads}" if workers
                  else f"{threads}, no worker processes")
    return f"{'tf.data' if loader == 'tf' else 'grain'} ({counts}; {'; '.join(why + [str(cpu_share())])})"


def _plural(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


# --------------------------------------------------------------------------
# Shared memory
# --------------------------------------------------------------------------
def shm_in_flight(workers: int, buffer: int, element_bytes: int) -> int:
    """Bytes of /dev/shm that `workers` grain worker processes with
    per_worker_buffer_size `buffer` hold at most, elements of `element_bytes`
    bytes: 2 * buffer + 2 elements per worker (measured with grain 0.2.18)
    and HELD_BY_CONSUMER more in the training loop; 0 without workers."""
    if not workers:
        return 0
    return (workers * (2 * buffer + 2) + HELD_BY_CONSUMER) * element_bytes


def shm_free(path: str = SHM_DIR) -> Optional[int]:
    """Free bytes of the filesystem at `path` (/dev/shm), None if it has none."""
    try:
        stat = os.statvfs(path)
    except (AttributeError, OSError):
        return None
    return stat.f_bavail * stat.f_frsize


def shm_budget(free: int, processes: int = 1) -> int:
    """What one of `processes` training processes of the host may fill of
    `free` bytes of /dev/shm: SHM_SHARE of it, shared evenly."""
    return int(free * SHM_SHARE) // max(1, processes)


def plan_shm(workers: int, buffer: int, element_bytes: int, budget: int) -> tuple[int, int]:
    """(workers, per_worker_buffer_size) whose `shm_in_flight` fits `budget`
    bytes: as asked if it fits; else a buffer of 1; else as many workers as
    fit with a buffer of 1, if at least 2 (one worker process delivers less
    than threads of the training process) or all that were asked; else
    (0, buffer): no worker processes."""
    if shm_in_flight(workers, buffer, element_bytes) <= budget:
        return workers, buffer
    if shm_in_flight(workers, 1, element_bytes) <= budget:
        return workers, 1
    fit = (budget // max(1, element_bytes) - HELD_BY_CONSUMER) // 4
    return (fit, 1) if fit >= min(2, workers) and fit > 0 else (0, buffer)


def shm_warning(asked: tuple[int, int], got: tuple[int, int], element_bytes: int, free: int, processes: int = 1,
                threads_alone: int = 1, path: str = SHM_DIR) -> str:
    """The one-line warning for workers reduced from `asked` to `got`
    ((workers, per_worker_buffer_size) each) to fit `free` bytes of `path`,
    with the shared memory they need and how to get it."""
    workers, buffer = asked
    held = shm_in_flight(workers, buffer, element_bytes)
    among = f", shared by {processes} training processes of this host" if processes > 1 else ""
    if got[0]:
        now = (f"running {_plural(got[0], 'worker process', 'worker processes')} with "
               f"{_plural(got[1], 'buffered step')} each")
    else:
        now = f"decoding in {_plural(threads_alone, 'thread')} of the training process, no worker processes (slower)"
    need = math.ceil(held * processes / SHM_SHARE / 2**30)
    return (f"grain: {_plural(workers, 'worker process', 'worker processes')} with {_plural(buffer, 'buffered step')} "
            f"of {_size(element_bytes)} each would hold up to {_size(held)} of {path}, more than this process may "
            f"fill ({_size(shm_budget(free, processes))}: half of its {_size(free)} free{among}); {now}. To fix: "
            f"give it {need} GB or more (docker run --shm-size={need}g), or lower --config.input_workers")


def _size(n: float) -> str:
    """n bytes for a message: '8.0 GB', '73.5 MB', '3.0 KB'."""
    unit = next(u for u in (3, 2, 1, 0) if n >= 2**(10 * u) or not u)
    return f"{n / 2**(10 * unit):.{1 if unit else 0}f} {('bytes', 'KB', 'MB', 'GB')[unit]}"


def fit_shm(workers: int, buffer: int, element_bytes: int, processes: int = 1, threads_alone: int = 1,
            path: str = SHM_DIR) -> tuple[int, int]:
    """`plan_shm` for the free space of `path` now, logging `shm_warning`
    (once per distinct reduction) when it reduces; unchanged when `path`
    cannot be read (no /dev/shm to check)."""
    free = shm_free(path) if workers else None
    if free is None:
        return workers, buffer
    got = plan_shm(workers, buffer, element_bytes, shm_budget(free, processes))
    key = (workers, buffer, element_bytes, got)
    if got != (workers, buffer) and key not in _warned:
        _warned.add(key)
        logging.warning(shm_warning((workers, buffer), got, element_bytes, free, processes, threads_alone, path))
    return got

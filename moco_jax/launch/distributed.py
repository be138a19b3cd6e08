"""Joining the processes of a multi-host run, and checking they agree.

JAX runs one Python process per host (or per GPU), each driving its local
devices; `jax.distributed.initialize` connects them so that `jax.devices()`
lists the devices of all processes and collectives span them. It must run
before anything touches a device.

`maybe_initialize` decides whether to call it:

* explicit: a coordinator address, process count and process id from flags,
  or from $MOCO_COORDINATOR_ADDRESS, $MOCO_NUM_PROCESSES, $MOCO_PROCESS_ID
  (and optionally $MOCO_LOCAL_DEVICE_IDS, comma-separated);
* automatic, with no arguments (JAX reads the layout from the launcher),
  where JAX can detect the cluster: a SLURM step with several tasks (`srun`),
  Open MPI with several ranks (`mpirun`), or a Cloud TPU VM (single host or
  pod slice);
* otherwise nothing: one process drives all local devices.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from moco_jax.core import sharding
from moco_jax.core.config import flatten_dotted
from moco_jax.core.errors import ConfigError

ENV_COORDINATOR_ADDRESS = "MOCO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MOCO_NUM_PROCESSES"
ENV_PROCESS_ID = "MOCO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MOCO_LOCAL_DEVICE_IDS"

# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py): the
# variables `srun` sets for a job step.
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                    "SLURM_STEP_NUM_NODES")
_GOOGLE_PCI_VENDOR_ID = "0x1ae0"  # Cloud TPU chips, as jax/_src/hardware_utils.py finds them


def _int_env(environ: Mapping[str, str], name: str, default: int = 1) -> int:
    try:
        return int(environ.get(name, default))
    except ValueError:
        return default


def _cloud_tpu_present() -> bool:
    """libtpu installed and a Google TPU chip on the PCI bus."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR_ID:
                    return True
        except OSError:
            continue
    return False


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher JAX can read the process layout from: 'slurm', 'ompi',
    'tpu', or None (a plain single-process run)."""
    environ = os.environ if environ is None else environ
    if all(v in environ for v in _SLURM_STEP_VARS) and _int_env(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int_env(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    if _cloud_tpu_present():
        return "tpu"
    return None


def local_device_ids_setting(
    local_device_ids: str | Sequence[int] | None, environ: Mapping[str, str]
) -> list[int] | None:
    """The argument, else $MOCO_LOCAL_DEVICE_IDS ("0,1"), as a list; None: all."""
    value = local_device_ids if local_device_ids is not None else environ.get(ENV_LOCAL_DEVICE_IDS)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"local_device_ids={value!r} must be comma-separated device ids, e.g. '0,1' "
                          f"(--local_device_ids or ${ENV_LOCAL_DEVICE_IDS})") from None


def explicit_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """The process layout given by arguments (first) or $MOCO_* variables, or
    None if neither gives any. Raises ValueError if it is incomplete."""
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS) or None
    count = num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else environ.get(ENV_PROCESS_ID)
    given = {"coordinator_address": address, "num_processes": count, "process_id": index}
    if all(v is None or v == "" for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None or v == ""]
    if missing:
        raise ConfigError(
            f"incomplete multi-process settings: {', '.join(missing)} missing (give all of coordinator_address, "
            f"num_processes and process_id, as flags or as ${ENV_COORDINATOR_ADDRESS}, ${ENV_NUM_PROCESSES}, "
            f"${ENV_PROCESS_ID})"
        )
    count = _int_setting("num_processes", count, ENV_NUM_PROCESSES)
    index = _int_setting("process_id", index, ENV_PROCESS_ID)
    if count < 1:
        raise ConfigError(f"num_processes={count} must be >= 1")
    if not 0 <= index < count:
        raise ConfigError(f"process_id={index} must lie in [0, num_processes={count})")
    return {"coordinator_address": address, "num_processes": count, "process_id": index,
            "local_device_ids": local_device_ids_setting(local_device_ids, environ)}


def _int_setting(name: str, value, env: str) -> int:
    """A process count or id given as a flag or in an environment variable."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be an integer (--{name} or ${env})") from None


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Call `jax.distributed.initialize` if this run spans several processes.

    Call it first, before anything touches a device. Returns whether it
    initialised the distributed runtime.
    """
    if jax.distributed.is_initialized():
        return True
    environ = os.environ if environ is None else environ
    settings = explicit_settings(coordinator_address, num_processes, process_id, local_device_ids, environ)
    if settings is not None:
        if settings["num_processes"] == 1:
            return False  # a one-process "cluster" needs no coordinator
        logging.info("jax.distributed.initialize(%s)", settings)
        jax.distributed.initialize(**settings)
        return True
    cluster = detected_cluster(environ)
    if cluster is None:
        return False
    logging.info("jax.distributed.initialize(): %s cluster detected", cluster)
    jax.distributed.initialize(local_device_ids=local_device_ids_setting(local_device_ids, environ))
    return True


def define_process_flags(flag_values=None) -> Callable[[], bool]:
    """Define the multi-process flags of train.py, --coordinator_address,
    --num_processes, --process_id and --local_device_ids, for another program
    (`moco_jax.knn_eval`); returns `join()`, which calls `maybe_initialize`
    with their values (first thing in main, before anything touches a
    device) and returns whether the run spans several processes."""
    from absl import flags  # noqa: PLC0415 - programs only

    flag_values = flags.FLAGS if flag_values is None else flag_values
    define = functools.partial(flags.DEFINE_string, flag_values=flag_values)
    coordinator = define("coordinator_address", None,
                         f"host:port of process 0, for a multi-process run (or ${ENV_COORDINATOR_ADDRESS}).")
    count = flags.DEFINE_integer("num_processes", None, f"Processes in a multi-process run (or ${ENV_NUM_PROCESSES}).",
                                 flag_values=flag_values)
    index = flags.DEFINE_integer("process_id", None,
                                 f"This process's index in [0, num_processes) (or ${ENV_PROCESS_ID}).",
                                 flag_values=flag_values)
    device_ids = define("local_device_ids", None,
                        f"Comma-separated ids of the local devices this process drives (or ${ENV_LOCAL_DEVICE_IDS}); "
                        "default: all (one per process under SLURM / Open MPI on GPUs).")
    return lambda: maybe_initialize(coordinator.value, count.value, index.value, device_ids.value)


# ---------------------------------------------------------------------------
# All processes must train the same experiment.
# ---------------------------------------------------------------------------

def _gather_rows(row: np.ndarray) -> np.ndarray:
    """Every process's `row` (the same shape on all), stacked in process
    order: (process_count, ...). A collective: all processes must call it.

    It runs as an all_gather over the pmap axis, i.e. over the same devices
    in the same order as the training step's collectives, on purpose: the
    first collective over a set of devices sets up their communicators (for
    CPU, gloo contexts that must form within 30 s), and doing that here,
    while the processes are in step right after start-up, keeps a slow
    compilation of the training step on one host from timing it out.
    """
    n_local = jax.local_device_count()
    rows = sharding.shard(np.broadcast_to(row, (n_local,) + row.shape))
    gathered = jax.pmap(lambda x: jax.lax.all_gather(x, sharding.AXIS), axis_name=sharding.AXIS)(rows)
    per_device = np.asarray(gathered.addressable_shards[0].data)[0]  # (n_devices, ...), process by process
    return per_device[::n_local]


def _allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's `payload`, in process order (a collective)."""
    lengths = _gather_rows(np.asarray([len(payload)], np.int32))[:, 0]
    buffer = np.zeros(int(lengths.max()), np.uint8)
    buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = _gather_rows(buffer)  # (processes, max_length)
    return [bytes(row[:n]) for row, n in zip(gathered, lengths)]


def config_differences(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """'process i: field=value (process 0: value)' for every field where a
    process's config (a nested dict) differs from process 0's."""
    reference = flatten_dotted(dict(configs[0]))
    lines = []
    for i, other in enumerate(configs[1:], start=1):
        flat = flatten_dotted(dict(other))
        for name in sorted(set(reference) | set(flat)):
            if reference.get(name, "<missing>") != flat.get(name, "<missing>"):
                lines.append(f"process {i}: {name}={flat.get(name, '<missing>')!r} "
                             f"(process 0: {reference.get(name, '<missing>')!r})")
    return lines


def check_same_config(config) -> None:
    """Raise ValueError on every process if the processes were started with
    different configs (a typo in one worker's command line would otherwise
    train a silently inconsistent model, or hang in a collective)."""
    if jax.process_count() == 1:
        return
    payload = config.to_json_best_effort(sort_keys=True).encode()
    configs = [json.loads(p) for p in _allgather_bytes(payload)]
    differences = config_differences(configs)
    if differences:
        raise ConfigError(
            "the processes of this run were started with different configs; every process must get the same "
            "--config and --config.* flags. Differences: " + "; ".join(differences)
        )

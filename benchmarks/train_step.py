"""Steady-state MoCo training-step benchmark on whatever devices exist.

Synthetic uint8 images go through the real step: `trainer.make_train_step`
(on-device augmentation; v2: shuffle BN, sharded queue, SGD; v3: symmetric
loss against the global batch's keys, SyncBN heads, AdamW), with the state from
`state.create_train_state` / `state.to_devices` and `optim.make_optimizer`.
By default the images are placed on the devices before timing, so the
numbers are the device step alone; `--feed host` copies them every step
through the trainer's `prefetch_to_device` instead, and
`--sync_every_step` fetches the metrics after every step (the trainer fetches
them only at log steps): both measure what those means are worth.

  python -m benchmarks.train_step                       # R50 224px + CIFAR R18, fp32 + bf16
  python -m benchmarks.train_step --models vits16_224,vitb16_224   # MoCo v3 ViT-S/16, ViT-B/16
  python -m benchmarks.train_step --models vit_test --steps 3 --warmup 1   # MoCo v3 CPU smoke run
  python -m benchmarks.train_step --models r18_cifar32 --dtypes bfloat16 --json /tmp/r18.json
  python -m benchmarks.train_step --tiny                # width-4 ResNet-10, 8px: a CPU smoke run

Columns (memory and FLOPs are per device):
  pairs/s      image pairs (query + key view) per second, all devices.
  step ms      wall time of one step, averaged over `--steps` after `--warmup`.
  compile s    trace + lower + XLA compile of the step (`.lower().compile()`;
               the first call then reuses that executable).
  peak GiB     `Device.memory_stats()["peak_bytes_in_use"]` where the backend
               has it (GPU, TPU; whole process, max over devices), else the
               compiled step's `memory_analysis()`: arguments + outputs -
               donated aliases + temporaries (JSON `peak_mem_source`; the
               latter is always in JSON `compiled_mem_gib`). The allocator's
               peak cannot be reset, so a row that stays below an earlier
               row's peak reports `memory_analysis` too.
  model GF     model FLOPs per pair, the MFU numerator: 4 x the encoder's
               forward FLOPs at the crop size (query forward + backward ~ 3
               forwards, key forward 1); 8 x for MoCo v3, whose symmetric
               loss runs both views through both encoders; augmentation,
               loss and optimizer work are not counted. ViTs: XLA's count
               (ViT-S/16 9.2, ViT-B/16 35.1 GFLOP per 224px forward by the
               usual 4.6 / 17.6 GMACs count, before the heads). For R50 and R18 the conventional counts of
               issue 7 (32.7 and 4.45 GFLOP, multiply-adds x 2 including the
               zero padding); for other models XLA's count of the forward
               (JSON `xla_model_gflop_per_pair`, also given for R50/R18: 31.9 and
               3.87, lower because XLA skips the taps that fall on padding).
  XLA GF       everything the compiled step executes per pair, by XLA's count.
  MFU          pairs/s x model GF / peak FLOP/s of the device(s).
  recompiles   compilations during the timed steps (must be 0).
  recv MB      bytes a device receives from the others per step through the
               step's all-gathers and all-to-alls, (n-1)/n of their results
               in the step's HLO (shuffle BN's images and keys, v3's and the
               queue's keys); JSON `collective_mb`: every collective's result
               bytes by kind, all-reduces (gradients, BN statistics) included.

Bytes only, on any number of devices (lowered, not compiled or run: a
CPU emulating 8 devices measures what an 8-GPU host exchanges):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.train_step --exchange \
      --models r50_224 --shuffle_mode all_gather,all_to_all,auto
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import platform
import re
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs import default as default_config
from moco_jax.core import optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.training.checks import validate_config
from moco_jax.data.feed import prefetch_to_device
from moco_jax.training import trainer
from moco_jax import methods


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked experiment: model, images, MoCo v2 recipe, batch."""

    depth: int
    width: int
    stem: str
    input_size: int  # side of the stored uint8 images fed to the step
    crop_size: int  # side after the on-device RandomResizedCrop
    augmentation: str
    crop_scale: tuple[float, float]
    queue_size: int  # K (rounded up to a multiple of the global batch)
    ema_momentum: float
    local_batch: int  # default images per device
    bn_splits: int  # BN groups per device (8 emulates 8-GPU shuffle BN on one GPU, as the CIFAR demo)
    reference_gflop: float | None = None  # the conventional model FLOPs per pair (issue 7)
    method: str = "moco_v2"
    vit: str = ""  # a ViT size (core/vit.py VIT_SIZES) for MoCo v3 ViT rows; "" = the ResNet above
    patch_size: int = 16


MODELS = {
    # MoCo v2 ImageNet: ResNet-50, K=65536, m=0.999, images stored at 256px, cropped to 224.
    "r50_224": ModelSpec(50, 64, "imagenet", 256, 224, "moco_v2", (0.2, 1.0), 65536, 0.999, 256, 1, 32.7),
    # The official CIFAR-10 demo: ResNet-18 with the 3x3 stem, K=4096, m=0.99, batch 512, split BN 8.
    "r18_cifar32": ModelSpec(18, 64, "cifar", 32, 32, "cifar", (0.08, 1.0), 4096, 0.99, 512, 8, 4.45),
    # A smoke test that compiles in seconds on a CPU.
    "tiny": ModelSpec(10, 4, "cifar", 8, 8, "cifar", (0.08, 1.0), 64, 0.99, 8, 1),
    # MoCo v3 (configs/moco_v3_vit_*.py): no queue, m=0.99 (cosine), images stored at 256px, cropped to 224;
    # 128 / 64 images per device as the paper's batch 4096 on 32 / 64 GPUs.
    "vits16_224": ModelSpec(0, 0, "", 256, 224, "moco_v3", (0.08, 1.0), 0, 0.99, 128, 1, method="moco_v3",
                            vit="small"),
    "vitb16_224": ModelSpec(0, 0, "", 256, 224, "moco_v3", (0.08, 1.0), 0, 0.99, 64, 1, method="moco_v3",
                            vit="base"),
    # MoCo v3 ResNet-50 (configs/moco_v3_r50.py: SyncBN, LARS, 4096-wide heads): 8 x 8.18 GFLOP per pair.
    "r50v3_224": ModelSpec(50, 64, "imagenet", 256, 224, "moco_v3", (0.2, 1.0), 0, 0.99, 128, 1, 65.4,
                           method="moco_v3"),
    "vit_test": ModelSpec(0, 0, "", 16, 16, "cifar_v3", (0.08, 1.0), 0, 0.99, 8, 1, method="moco_v3",
                          vit="test", patch_size=4),
}

# Dense (no 2:4 sparsity) peak FLOP/s per device, in TFLOP/s, for the matmul
# unit a model dtype runs on. float32 convolutions run as TF32 on NVIDIA
# Ampere+ and in bfloat16 passes on TPU by JAX's default precision
# (docs.jax.dev/en/latest/201/precision.html), hence those peaks.
# Sources: NVIDIA H100 / H200 / A100 datasheets (sparse figures halved);
# Google Cloud TPU system-architecture pages. Matched against
# `device_kind` in order; override with --peak_tflops (e.g. 790, the bf16
# matmul rate issue 7 says was measured on an H200).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),  # SXM
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),  # SXM; same GH100 compute as H100 SXM
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),  # v5e
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),  # v6e (Trillium)
]

COLUMNS = (
    "model", "dtype", "remat", "devices", "local_batch", "pairs_per_s", "step_ms", "compile_s", "peak_mem_gib",
    "model_gflop_per_pair", "xla_gflop_per_pair", "mfu", "recv_mb", "fits_local_batch", "recompiles",
)
EXCHANGE_COLUMNS = ("model", "dtype", "devices", "local_batch", "shuffle_mode", "recv_mb", "all_reduce_mb")

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_compilations: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compilations.append(event) if event in _COMPILE_EVENTS else None
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype` from PEAK_TFLOPS, None if unknown (e.g. CPU)."""
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks[dtype]
    return None


PROBE_CLASSES = 1000  # the online probe's classes (`--online_probe`), as on ImageNet


def experiment_config(spec: ModelSpec, dtype: str, global_batch: int, shuffle_mode: str, bn_splits: int):
    """configs/default.py turned into the MoCo experiment of `spec`."""
    if spec.method == "moco_v3":
        return _v3_config(spec, dtype, global_batch)
    config = default_config.get_config()
    config.model.depth, config.model.width, config.model.stem = spec.depth, spec.width, spec.stem
    config.model.head, config.model.dtype = "mlp", dtype
    config.embed_dim, config.bn_splits = 128, bn_splits
    config.image_size, config.crop_size = spec.input_size, spec.crop_size
    config.augmentation, config.crop_scale = spec.augmentation, spec.crop_scale
    config.batch_size = global_batch
    config.queue_size = math.ceil(spec.queue_size / global_batch) * global_batch
    config.temperature, config.momentum = 0.2, spec.ema_momentum
    config.shuffle_bn, config.shuffle_mode = True, shuffle_mode
    return config


def _v3_config(spec: ModelSpec, dtype: str, global_batch: int):
    """configs/moco_v3_vit_small.py with the ViT, images and batch of `spec`
    (configs/moco_v3_r50.py for a ResNet spec)."""
    from configs import moco_v3_r50, moco_v3_vit_small  # noqa: PLC0415

    if spec.vit:
        config = moco_v3_vit_small.get_config()
        config.model.vit, config.model.patch_size = spec.vit, spec.patch_size
    else:
        config = moco_v3_r50.get_config()
    config.model.dtype = dtype
    config.image_size, config.crop_size = spec.input_size, spec.crop_size
    config.augmentation, config.crop_scale = spec.augmentation, spec.crop_scale
    config.batch_size, config.momentum = global_batch, spec.ema_momentum
    if spec.vit == "test":  # the CPU smoke row: small heads too
        config.model.mlp_dim, config.embed_dim = 64, 32
    return config


def model_gflop_per_pair(config) -> float | None:
    """4 x (MoCo v3: 8 x) forward GFLOP of one image (see the module docstring), from XLA's
    cost analysis of the un-optimised float32 forward (the count is the same
    for bfloat16, minus its casts): shapes only, nothing is run. Where the
    backend has no cost analysis before compilation (jax 0.11 on GPU returns
    None), the compiled forward's count; None if neither exists."""
    config = config.copy_and_resolve_references()
    config.model.dtype = "float32"
    encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
    image = jax.ShapeDtypeStruct((1, config.crop_size, config.crop_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), image)
    lowered = jax.jit(lambda v, x: encoder.apply(v, x, train=False)).lower(variables, image)
    flops = cost_flops(lowered.cost_analysis())
    if flops is None:
        flops = xla_flops(lowered.compile())
    if flops is None:
        return None
    forwards = 8 if config.method == "moco_v3" else 4
    return forwards * flops / 1e9


def compiled_memory_bytes(compiled) -> float | None:
    """Per-device bytes the compiled step needs: arguments + outputs - donated
    aliases + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return float(
        stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    )


def device_peak_bytes(devices: Sequence[jax.Device]) -> float | None:
    """Peak bytes in use over `devices` (whole process), if the backend reports it."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return float(max(peaks)) if peaks and all(p is not None for p in peaks) else None


def cost_flops(cost) -> float | None:
    """The "flops" entry of an XLA cost analysis (a dict, or a list holding
    one), or None where the backend gives none."""
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def xla_flops(compiled) -> float | None:
    """FLOPs of one execution of a compiled computation on one device, by XLA's count."""
    return cost_flops(compiled.cost_analysis())


_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)\(")
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+)\[([\d,]*)\]")


def _array_bytes(dtype: str, dims: str) -> int:
    itemsize = 1 if dtype == "pred" else 2 if dtype == "bf16" else int(dtype[1:]) // 8
    return itemsize * math.prod(int(d) for d in dims.split(",") if d)


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Per-device bytes of the results of each kind of collective in one
    execution of a program, from its HLO text (`lowered.as_text("hlo")`):
    e.g. {"all-gather": ..., "all-to-all": ..., "all-reduce": ...}."""
    total: dict[str, int] = {}
    for result, op in _COLLECTIVE.findall(hlo_text):
        total[op] = total.get(op, 0) + sum(_array_bytes(*array) for array in _ARRAY.findall(result))
    return total


def received_bytes(collectives: dict[str, int], num_devices: int) -> float:
    """What one device receives from the others through all-gathers and
    all-to-alls: (n-1)/n of their results (its own share stays put)."""
    return (collectives.get("all-gather", 0) + collectives.get("all-to-all", 0)) * (num_devices - 1) / num_devices


def synthetic_batches(num_devices: int, local_batch: int, size: int, count: int = 2, seed: int = 0) -> list:
    """`count` different host uint8 batches (n, B_local, size, size, 3)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (num_devices, local_batch, size, size, 3), dtype=np.uint8) for _ in range(count)]


def batch_stream(host_batches: list, feed: str) -> Iterator:
    """Endless device batches. feed="device": placed on the devices once, so
    only the step is timed; "host": copied every step through the trainer's
    `prefetch_to_device` (2 batches ahead)."""
    if feed == "device":
        return itertools.cycle([sharding.shard(b) for b in host_batches])
    return prefetch_to_device(itertools.cycle(host_batches), size=2)


def benchmark(name: str, dtype: str, local_batch: int | None = None, steps: int = 20, warmup: int = 5,
              shuffle_mode: str = "auto", peak: float | None = None,
              bn_splits: int | None = None, feed: str = "device", sync_every_step: bool = False,
              online_probe: bool = False, remat: str = "none", fit: bool = False,
              memory_gib: float | None = None) -> dict[str, Any]:
    """Measure one (model, dtype) step; returns one row of the table.
    `online_probe`: the step also trains the online linear probe (1000 classes).
    `remat`: `model.remat`. `fit`: also the largest per-device batch that
    fits (`largest_batch`) in `memory_gib` (default: the device's limit)."""
    spec = MODELS[name]
    devices = jax.local_devices()
    n, local_batch, bn_splits = len(devices), local_batch or spec.local_batch, bn_splits or spec.bn_splits
    config = experiment_config(spec, dtype, n * local_batch, shuffle_mode, bn_splits)
    config.online_probe, config.model.remat = online_probe, remat
    validate_config(config, jax.device_count())

    encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=1000)
    image_shape = (spec.crop_size, spec.crop_size, 3)
    host_state = state_lib.create_train_state(
        jax.random.key(0), encoder, tx, image_shape, config.queue_size, config.embed_dim
    )
    host_state = trainer.with_online_probe(host_state, config, encoder, PROBE_CLASSES)
    xla_model_gflop = model_gflop_per_pair(config)
    model_gflop = spec.reference_gflop or xla_model_gflop
    p_state = state_lib.to_devices(host_state)
    del host_state
    host_batches = synthetic_batches(n, local_batch, spec.input_size)
    if online_probe:  # with labels
        host_batches = [(b, np.arange(n * local_batch, dtype=np.int32).reshape(n, -1) % PROBE_CLASSES)
                        for b in host_batches]
    # (the length only shapes v3's momentum curve)
    p_step = trainer.make_train_step(config, total_steps=100_000, num_classes=PROBE_CLASSES)
    peak_before = device_peak_bytes(devices)  # the allocator's peak cannot be reset between rows

    start = time.perf_counter()
    lowered = p_step.lower(p_state, sharding.shard(host_batches[0]))
    compiled = lowered.compile()  # the jit cache keeps it: the first call does not compile again
    compile_s = time.perf_counter() - start
    if shuffle_mode == "all_to_all" and "all_to_all" not in lowered.as_text():
        raise RuntimeError("shuffle_mode='all_to_all' was asked for, but the step has no all_to_all: "
                           "trainer.make_train_step does not pass config.shuffle_mode to MoCoHParams")

    batches = batch_stream(host_batches, feed)
    for _ in range(warmup):
        p_state, _ = p_step(p_state, next(batches))
    jax.block_until_ready(p_state)
    compilations_before = len(_compilations)
    start = time.perf_counter()
    for _ in range(steps):
        p_state, metrics = p_step(p_state, next(batches))
        if sync_every_step:  # what fetching metrics every step would cost
            jax.device_get(metrics)
    jax.block_until_ready((p_state, metrics))  # else fetched once, as the trainer does at log steps
    elapsed = time.perf_counter() - start
    recompiles = len(_compilations) - compilations_before
    # After the timed steps: asking for `lowered`'s HLO text before them made them count 2 compilations.
    collectives = collective_bytes(lowered.as_text("hlo"))
    loss = float(np.asarray(metrics["loss"])[0])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{name} {dtype}: non-finite loss {loss}")

    pairs_per_s = steps * n * local_batch / elapsed
    compiled_memory, memory = compiled_memory_bytes(compiled), device_peak_bytes(devices)
    memory_source = "memory_stats"
    if memory is None or (peak_before is not None and memory <= peak_before):
        # No allocator statistics, or an earlier row of this process set the peak.
        memory, memory_source = compiled_memory, "memory_analysis"
    step_flops = xla_flops(compiled)
    peak = peak if peak is not None else peak_tflops(devices[0].device_kind, dtype)
    fits = None
    if fit:
        del p_state  # its buffers, before another compile
        fits = largest_batch(config, spec, local_batch, compiled_memory, devices, memory_gib)
    return {
        "model": name,
        "dtype": dtype,
        "remat": remat,
        "devices": n,
        "device_kind": devices[0].device_kind,
        "local_batch": local_batch,
        "global_batch": n * local_batch,
        "image": f"{spec.input_size}->{spec.crop_size}",
        "queue_size": config.queue_size,
        "shuffle_mode": shuffle_mode,
        "online_probe": online_probe,
        "bn_splits": bn_splits,
        "feed": feed,
        "sync_every_step": sync_every_step,
        "steps": steps,
        "pairs_per_s": pairs_per_s,
        "step_ms": 1000 * elapsed / steps,
        "compile_s": compile_s,
        "peak_mem_gib": None if memory is None else memory / 2**30,
        "peak_mem_source": memory_source,
        "compiled_mem_gib": None if compiled_memory is None else compiled_memory / 2**30,
        "model_gflop_per_pair": model_gflop,
        "xla_model_gflop_per_pair": xla_model_gflop,
        "xla_gflop_per_pair": None if step_flops is None else step_flops / local_batch / 1e9,
        "peak_tflops_per_device": peak,
        "mfu": None if not peak else pairs_per_s * model_gflop * 1e9 / (n * peak * 1e12),
        "recv_mb": received_bytes(collectives, n) / 1e6,
        "collective_mb": {op: size / 1e6 for op, size in collectives.items()},
        "fits_local_batch": fits,
        "recompiles": recompiles,
        "final_loss": loss,
    }


def largest_batch(config, spec: ModelSpec, local_batch: int, step_bytes: float | None,
                  devices: Sequence[jax.Device], memory_gib: float | None = None) -> int | None:
    """The largest per-device batch (a multiple of 8) whose step fits in
    `memory_gib` (default: 95% of the device's `bytes_limit`), projected
    linearly from the compiled step's bytes (`compiled_memory_bytes`) at
    `local_batch` (`step_bytes`) and at twice it (compiled from abstract
    inputs, not run); None where neither limit nor bytes are known."""
    limit = memory_gib * 2**30 if memory_gib else None
    if limit is None:
        stats = devices[0].memory_stats() or {}
        limit = 0.95 * stats["bytes_limit"] if "bytes_limit" in stats else None
    if limit is None or step_bytes is None:
        return None
    double = config.copy_and_resolve_references()
    double.batch_size = 2 * config.batch_size
    if spec.method == "moco_v2":
        double.queue_size = math.ceil(spec.queue_size / double.batch_size) * double.batch_size
    per_pair = (compiled_memory_bytes(_lowered_step(double, spec, len(devices)).compile()) - step_bytes) / local_batch
    if per_pair <= 0:
        return None
    return int((limit - (step_bytes - per_pair * local_batch)) // per_pair) // 8 * 8


def _lowered_step(config, spec: ModelSpec, num_devices: int):
    """The pmap-ed train step of `config` lowered from abstract inputs (the
    state's and a uint8 batch's shapes): nothing is allocated."""
    encoder = methods.build_encoder(config, axis_name=sharding.AXIS)
    tx, _ = optim.make_optimizer(config, steps_per_epoch=1000)
    image_shape = (spec.crop_size, spec.crop_size, 3)
    state = jax.eval_shape(lambda: state_lib.create_train_state(
        jax.random.key(0), encoder, tx, image_shape, methods.get(config).queue_size(config), config.embed_dim))
    p_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_devices,) + x.shape, x.dtype), state)
    local_batch = config.batch_size // num_devices
    batch = jax.ShapeDtypeStruct((num_devices, local_batch, spec.input_size, spec.input_size, 3), np.uint8)
    return trainer.make_train_step(config, total_steps=100_000).lower(p_state, batch)


def exchange(name: str, dtype: str, local_batch: int | None, shuffle_mode: str) -> dict[str, Any]:
    """The bytes of one (model, dtype, shuffle mode) step on every local
    device, from its lowered program (nothing compiled or run)."""
    spec, n = MODELS[name], jax.local_device_count()
    local_batch = local_batch or spec.local_batch
    config = experiment_config(spec, dtype, n * local_batch, shuffle_mode, spec.bn_splits)
    validate_config(config, jax.device_count())
    collectives = collective_bytes(_lowered_step(config, spec, n).as_text("hlo"))
    return {"model": name, "dtype": dtype, "devices": n, "local_batch": local_batch, "shuffle_mode": shuffle_mode,
            "recv_mb": received_bytes(collectives, n) / 1e6, "all_reduce_mb": collectives.get("all-reduce", 0) / 1e6,
            "collective_mb": {op: size / 1e6 for op, size in collectives.items()}}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table of `columns`, one line per row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import flax
    import optax

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "backend": jax.default_backend(),
        "device_kind": jax.local_devices()[0].device_kind,
        "local_devices": jax.local_device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "compilation_cache": jax.config.jax_compilation_cache_dir,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="r50_224,r18_cifar32", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--local_batch", type=int, default=None, help="images per device (default: per model)")
    parser.add_argument("--bn_splits", type=int, default=None, help="BN groups per device (default: per model)")
    parser.add_argument("--feed", default="device", choices=("device", "host"),
                        help="device: batches placed once (step alone); host: prefetched from numpy every step")
    parser.add_argument("--sync_every_step", action="store_true", help="fetch the metrics after every step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
    parser.add_argument("--shuffle_mode", default="auto",
                        help="MoCo v2's shuffle BN: auto, all_gather or all_to_all (comma-separated with --exchange)")
    parser.add_argument("--exchange", action="store_true",
                        help="only the bytes each device exchanges per step, from the lowered step (nothing run)")
    parser.add_argument("--online_probe", action="store_true", help="also train the online linear probe in the step")
    parser.add_argument("--remat", default="none", help="comma-separated model.remat values: none, blocks")
    parser.add_argument("--fit", action="store_true",
                        help="also the largest per-device batch that fits (one more compile per row)")
    parser.add_argument("--memory_gib", type=float, default=None,
                        help="the memory --fit fits into (default: 95%% of the device's limit)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak; default: PEAK_TFLOPS table")
    parser.add_argument("--json", default=None, help="also write {environment, rows} to this path")
    parser.add_argument("--tiny", action="store_true", help="= --models tiny --steps 3 --warmup 1 (CPU smoke run)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.steps, args.warmup = "tiny", 3, 1
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {sorted(MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; print the table (and write JSON); return its rows."""
    args = parse_args(argv)
    env = environment()
    devices = f"{env['local_devices']} x {env['device_kind']} ({env['backend']})"
    print(f"# {devices}, jax {env['jax']}, {env['date_utc']} UTC")
    if args.exchange:
        rows = [exchange(name, dtype, args.local_batch, mode) for name in args.models.split(",")
                for dtype in args.dtypes.split(",") for mode in args.shuffle_mode.split(",")]
        print(format_table(rows, EXCHANGE_COLUMNS))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "rows": rows}, f, indent=2)
        return rows
    rows = []
    for name, dtype, remat in itertools.product(args.models.split(","), args.dtypes.split(","),
                                                args.remat.split(",")):
        rows.append(benchmark(name, dtype, args.local_batch, args.steps, args.warmup, args.shuffle_mode,
                              args.peak_tflops, args.bn_splits, args.feed, args.sync_every_step,
                              args.online_probe, remat, args.fit, args.memory_gib))
        print(f"  {name} {dtype} remat={remat}: {rows[-1]['pairs_per_s']:.1f} pairs/s", file=sys.stderr,
              flush=True)
        if args.json:  # after every row: a row that runs out of time or memory keeps the ones before
            with open(args.json, "w") as f:
                json.dump({"environment": env, "rows": rows}, f, indent=2)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

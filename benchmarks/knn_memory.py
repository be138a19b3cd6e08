"""Device memory of the weighted kNN at ImageNet size, from XLA's memory
analysis of the compiled programs (nothing is allocated, so it runs on a CPU):
the whole bank on one device (`knn.knn_predict`, all queries at once) against
the streamed kNN's query step (`knn.owned_votes` + `knn.count_correct`, what
the monitor and `knn_eval` run, per device): the bank split over n devices,
one global batch of queries scored against it.

  python -m benchmarks.knn_memory                          # 1.28M x 2048 bank, 50k queries, 8 devices
  python -m benchmarks.knn_memory --bank 1281167 --dim 128 # the projection features

One JSON line per layout: argument, output and temporary memory per device, in GiB (and bytes).
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=1_281_167, help="bank images (ImageNet-1k train)")
    parser.add_argument("--queries", type=int, default=50_000, help="query images (ImageNet-1k val)")
    parser.add_argument("--dim", type=int, default=2048, help="feature width (ResNet-50 backbone)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="queries per global step (eval_batch_size)")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax  # noqa: PLC0415 - after the device count is set
    import jax.numpy as jnp  # noqa: PLC0415

    from moco_jax.eval import knn  # noqa: PLC0415

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    single = knn.knn_predict.lower(f32(args.queries, args.dim), f32(args.bank, args.dim), i32(args.bank),
                                   num_classes=args.classes, k=args.k, temperature=0.1)
    devices = tuple(jax.local_devices())
    n = len(devices)
    per_device = -(-args.batch // n)
    rows = -(-args.bank // (per_device * n)) * per_device  # steps of the bank stream x rows per device and step
    programs = knn._programs(knn._identity, devices, args.classes, args.k, 0.1, min(256, per_device * n))
    mapped = lambda dtype, *shape: jax.ShapeDtypeStruct((n,) + shape, dtype)  # noqa: E731
    bank = knn.Bank((mapped(jnp.float32, rows, args.dim),), mapped(jnp.int32, rows), mapped(jnp.int32, rows),
                    mapped(jnp.bool_, rows), mapped(jnp.int32))
    sharded = programs.count.lower(mapped(jnp.int32, 2), bank, {}, mapped(jnp.float32, per_device, args.dim),
                                   mapped(jnp.int32, per_device), mapped(jnp.bool_, per_device))
    for layout, lowered in (("one device", single), (f"bank over {n} devices, one query step, per device", sharded)):
        m = lowered.compile().memory_analysis()
        sizes = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "temp")}
        print(json.dumps({"layout": layout, "bank": args.bank, "queries": args.queries, "dim": args.dim,
                          **{f"{k}_gib": round(v / 2**30, 2) for k, v in sizes.items()},
                          "total_gib": round(sum(sizes.values()) / 2**30, 2), "total_bytes": sum(sizes.values()),
                          "argument_bytes": sizes["argument"]}))


if __name__ == "__main__":
    main()

"""Device memory of the weighted kNN at ImageNet size, from XLA's memory
analysis of the compiled programs (nothing is allocated, so it runs on a CPU):
the whole bank on one device (`knn.knn_predict`) against the bank split over
n devices (`knn.sharded_knn_predict`, per device).

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
    n, chunk = len(devices), 256
    rows, chunks = -(-args.bank // n), -(-args.queries // chunk)
    sharded = knn._sharded_scores_fn(devices, args.classes, args.k).lower(
        f32(chunks, chunk, args.dim), f32(n, rows, args.dim), i32(n, rows),
        jax.ShapeDtypeStruct((n, rows), jnp.bool_), jnp.float32(0.1))
    for layout, lowered in (("one device", single), (f"bank over {n} devices, per device", sharded)):
        m = lowered.compile().memory_analysis()
        sizes = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "temp")}
        print(json.dumps({"layout": layout, "bank": args.bank, "queries": args.queries, "dim": args.dim,
                          **{f"{k}_gib": round(v / 2**30, 2) for k, v in sizes.items()},
                          "total_gib": round(sum(sizes.values()) / 2**30, 2), "total_bytes": sum(sizes.values()),
                          "argument_bytes": sizes["argument"]}))


if __name__ == "__main__":
    main()

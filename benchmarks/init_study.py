"""One point of the convolution-init study (BENCHMARKS.md, "Convolution init"):
pretrain MoCo v2 on CIFAR-10 with one `model.conv_init`, one schedule length,
one seed and one learning-rate multiple, and print its kNN curve and weight
norms.

The defaults are the CPU study's shrunk demo recipe (`configs/moco_v2_cifar10.py`
at width 16, batch 128, a 10,000-image train subset, that subset as the kNN
bank, the 10,000 test images as queries):

  python -m benchmarks.init_study --conv_init torchvision --epochs 12 --seed 0
  python -m benchmarks.init_study --conv_init pytorch --epochs 48 --seed 1
  python -m benchmarks.init_study --conv_init torchvision --epochs 12 --lr_scale 4
  python -m benchmarks.init_study --conv_init torchvision --epochs 12 --conv_grad_scale pytorch_init

(the last: the torchvision init with each kernel's gradient scaled by 6 * in / out
channels, which under BN trains that init as if drawn at PyTorch's scale;
`moco_jax/core/optim.py` `conv_grad_scales`)

The same study at the demo's full size (a GPU: width 64, batch 512, all
50,000 images, 200 epochs):

  python -m benchmarks.init_study --conv_init pytorch --full --epochs 200

`--workdir` makes the point resumable (a rerun continues it, or, finished,
only prints it again) and keeps its `metrics.jsonl`; `--json` writes the
curve. kNN every `--knn_every_epochs` (default: 2 up to 24 epochs, else
epochs / 12) and at the end; weight norms at the same points and at step 0.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Sequence

from configs import moco_v2_cifar10
from moco_jax.core import models
from moco_jax.core.optim import CONV_GRAD_SCALES
from moco_jax.training import metrics, trainer

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(_HERE, os.pardir, os.pardir, "shared", "data", "cifar10")


def study_config(args: argparse.Namespace):
    """The CIFAR-10 demo config with this point's settings."""
    config = moco_v2_cifar10.get_config()
    config.dataset = "cifar10_arrays"
    config.data_dir = os.path.abspath(args.data_dir)
    if not args.full:  # the CPU study's shrunk recipe (issue 16)
        config.train_subset = 10_000
        config.knn_max_train_images = 10_000
        config.model.width = 16
        config.batch_size = 128
    config.model.conv_init = args.conv_init
    config.num_epochs = args.epochs
    config.seed = args.seed
    config.learning_rate *= args.lr_scale  # per 256 images; the batch scales it as always
    config.conv_grad_scale = args.conv_grad_scale
    config.knn_every_epochs = args.knn_every_epochs or (2 if args.epochs <= 24 else args.epochs / 12)
    config.checkpoint_every_epochs = config.knn_every_epochs
    config.checkpoint_every_steps = 0
    config.log_every_steps = 0
    config.log_every_epochs = 1
    return config


def curve(records: list[dict[str, Any]], final: dict[str, Any]) -> list[dict[str, Any]]:
    """The monitor records of metrics.jsonl (kNN and weight norms, one per
    monitored step) plus the final kNN, as rows {epoch, knn_*, weight_norm/*}.
    The epoch of a step comes from the training records, which log both."""
    logged = next(r for r in records if r.get("epoch"))
    steps_per_epoch = logged["step"] / logged["epoch"]
    rows: dict[int, dict[str, Any]] = {}
    for record in records:
        if any(k.startswith(("knn_", "weight_norm/")) for k in record):
            row = rows.setdefault(record["step"], {"epoch": record["step"] / steps_per_epoch})
            row.update({k: v for k, v in record.items() if k.startswith(("knn_", "weight_norm/"))})
    if 0 in rows:
        rows[0].update({k.replace("knn_random_", "knn_"): v for k, v in final.items()
                        if k.startswith("knn_random_")})
    last = final.get("step")
    if last in rows:
        rows[last].update({k: v for k, v in final.items() if k in ("knn_backbone", "knn_projection")})
    return [rows[s] for s in sorted(rows)]


def format_curve(rows: list[dict[str, Any]]) -> str:
    norms = sorted({k for row in rows for k in row if k.startswith("weight_norm/")})
    header = ["epoch", "kNN backbone", "kNN projection"] + [n.removeprefix("weight_norm/") for n in norms]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        knn = [f"{100 * row[k]:.1f}" if k in row else "" for k in ("knn_backbone", "knn_projection")]
        lines.append(" | ".join([f"{row['epoch']:g}", *knn, *(f"{row[n]:.2f}" for n in norms)]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conv_init", default="torchvision", choices=sorted(models.CONV_INITS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr_scale", type=float, default=1.0, help="multiplies the recipe's learning rate")
    parser.add_argument("--conv_grad_scale", default="none", choices=CONV_GRAD_SCALES,
                        help="pytorch_init: the kernels' gradients x 6 * in / out channels (core/optim.py)")
    parser.add_argument("--knn_every_epochs", type=float, default=0, help="0: 2 up to 24 epochs, else epochs / 12")
    parser.add_argument("--full", action="store_true", help="the demo's full size (width 64, batch 512, 50k images)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA, help="the CIFAR-10 files (../shared/data/cifar10)")
    parser.add_argument("--workdir", default="", help="resumable point (default: a temporary directory)")
    parser.add_argument("--json", default="", help="write the point's settings and curve here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    config = study_config(args)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        started = time.perf_counter()
        result = trainer.train_and_evaluate(config, workdir, show_progress=False)
        seconds = time.perf_counter() - started
        with open(os.path.join(workdir, metrics.FINAL_NAME)) as f:
            final = json.load(f)
        rows = curve(metrics.read_jsonl(workdir), final)
    point = {"conv_init": args.conv_init, "epochs": args.epochs, "seed": args.seed, "lr_scale": args.lr_scale,
             "conv_grad_scale": args.conv_grad_scale, "full": args.full, "seconds": seconds,
             "preempted": result["preempted"], "curve": rows}
    print(f"conv_init={args.conv_init} epochs={args.epochs:g} seed={args.seed} lr_scale={args.lr_scale:g}"
          f" conv_grad_scale={args.conv_grad_scale}{' full' if args.full else ''}: {seconds:.0f} s")
    print(format_curve(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(point, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

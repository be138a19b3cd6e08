"""The official PyTorch MoCo v2 training step on this machine's first GPU,
for the ratio moco_jax / official on the same GPU (benchmarks/gpu_session.py).

The code measured is facebookresearch/moco `moco/builder.py` at commit
3402035 (the repository's HEAD deletes it), never committed here: fetch it
into the git-ignored folder `.official/moco/` (`OFFICIAL_DIR`), e.g.

  git -C MOCO_CLONE show 3402035:moco/builder.py > .official/moco/builder.py

The step is main_moco.py's: the model wrapped in DistributedDataParallel (a
one-process process group: NCCL on a GPU, gloo on a CPU), `model(im_q,
im_k)` -> cross-entropy -> SGD (lr 0.03, momentum 0.9, weight decay 1e-4),
with torchvision's `resnet50`, the MLP head, K=65,536, m=0.999, T=0.2;
bfloat16 autocast and channels_last (`--dtype float32` without autocast).
The images are synthetic, already augmented and on the device: the official
code augments on the host in its data loader, so unlike moco_jax's
benchmark (which augments on the device inside the step) the official step
does no augmentation at all.

  python -m benchmarks.official_moco --local_batch 256 --json /tmp/official.json
  python -m benchmarks.official_moco --smoke    # CPU, a width-8 ResNet-18 at 32 px (moco_jax.torch_resnet)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

OFFICIAL_DIR = Path(__file__).resolve().parents[1] / ".official" / "moco"
COMMIT = "3402035"


def load_builder(folder: Path = OFFICIAL_DIR):
    """The official `moco.builder` module from `folder`/builder.py."""
    path = folder / "builder.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: fetch facebookresearch/moco's moco/builder.py at commit "
                                f"{COMMIT} into {folder} (benchmarks/official_moco.py says how)")
    spec = importlib.util.spec_from_file_location("official_moco_builder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_encoder(depth: int, width: int, stem: str):
    """torchvision's resnet{depth} (the official code's), or moco_jax's
    torchvision-compatible `torch_resnet.ResNet` where torchvision is absent
    or the model is not torchvision's (width != 64, the CIFAR stem):
    (constructor taking num_classes, its name)."""
    import functools

    if width == 64 and stem == "imagenet":
        try:
            import torchvision

            return getattr(torchvision.models, f"resnet{depth}"), f"torchvision resnet{depth}"
        except (ImportError, RuntimeError, AttributeError):
            pass
    from moco_jax import torch_resnet

    return (functools.partial(torch_resnet.ResNet, depth, width, stem),
            f"moco_jax.torch_resnet ResNet-{depth} width {width} {stem} stem")


def _process_group(device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="official_moco-"), "store")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=1)


def measure(local_batch: int = 256, queue_size: int = 65536, dtype: str = "bfloat16", size: int = 224,
            depth: int = 50, width: int = 64, stem: str = "imagenet", steps: int = 20, warmup: int = 5,
            builder_dir: Path = OFFICIAL_DIR) -> dict:
    """Pairs/s, step ms and peak memory of the official MoCo v2 step."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # the official code calls .cuda() on two index tensors
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.backends.cudnn.benchmark = True
    _process_group(device)
    builder = load_builder(builder_dir)
    encoder_fn, encoder_name = base_encoder(depth, width, stem)
    torch.manual_seed(0)
    model = builder.MoCo(encoder_fn, dim=128, K=queue_size, m=0.999, T=0.2, mlp=True)
    model = model.to(device, memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    generator = torch.Generator(device=device).manual_seed(1)
    images = [torch.randn(local_batch, 3, size, size, device=device, generator=generator)
              .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            output, target = ddp(im_q=images[0], im_k=images[1])
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    loss = float(loss.detach())
    if loss != loss:  # NaN
        raise FloatingPointError(f"official MoCo step: loss {loss}")
    return {
        "code": f"facebookresearch/moco@{COMMIT} moco/builder.py, DDP (1 process)",
        "encoder": encoder_name,
        "dtype": dtype,
        "autocast": dtype == "bfloat16",
        "channels_last": True,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "local_batch": local_batch,
        "queue_size": queue_size,
        "image": size,
        "steps": steps,
        "pairs_per_s": steps * local_batch / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": loss,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local_batch", type=int, default=256)
    parser.add_argument("--queue_size", type=int, default=65536)
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16 (autocast), float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--builder_dir", type=Path, default=OFFICIAL_DIR)
    parser.add_argument("--smoke", action="store_true", help="CPU-sized: ResNet-18 width 8, 32 px, batch 8, K 64")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = dict(size=32, depth=18, width=8, stem="cifar") if args.smoke else {}
    if args.smoke:
        args.local_batch, args.queue_size, args.steps, args.warmup = 8, 64, 2, 1
    rows = []
    for dtype in args.dtypes.split(","):
        rows.append(measure(args.local_batch, args.queue_size, dtype, steps=args.steps, warmup=args.warmup,
                            builder_dir=args.builder_dir, **shape))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

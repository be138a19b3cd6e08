"""The host side of an ImageNet-1k run, measured on ImageNet-sized stand-ins:
what one image costs the CPU, how images/s scale with grain workers, what a
worker holds in memory, and how long a launch takes to list and start.

  python -m benchmarks.imagenet_host                      # ~6 min on 2 cores
  python -m benchmarks.imagenet_host --workers 0,1,2,4,8,15 --big 130000

The stand-ins: `--photos` JPEGs of 500 x 375 (one in four 375 x 500), made
from the 224 px photos of ../shared/data/imagenette_sample (upscaled, with
sensor-like noise so that they weigh what ImageNet's JPEGs weigh, about
110 KB at quality 95; real ImageNet averages about 400 x 350 and 110 KB), in
1,000 class folders. For the memory and start-up rows, trees of `--small`
and `--big` files are made of symbolic links to those photos (listing and
decoding see real files; the disk holds each photo once).

Rows (JSON lines, and a dict returned by `main`):
  cpu        CPU-ms per image (both 224 px crops, RandomResizedCrop scale
             0.2-1 and 0.08-1) in one thread: the whole `grain.random_crops`
             of 64-image steps, resized by the host and (resize_on_device)
             decoded into slots for the accelerator, with the share of
             boxes the host still resizes and the bytes each way sends; then
             its parts (reading, header, decode, the two crops and resizes),
             with simplejpeg and with Pillow alone; and a decode at each
             DCT-domain reduction (1/1 to 1/8: what a smaller decode would
             save).
  device     what the step's views function costs the accelerator given
             the host's crops and given slots (XLA's FLOPs and bytes per
             pair, and its time on this machine's first device).
  scaling    images/s delivered by `trainer.pretrain_batches` (index, grain
             workers, shared memory) for each `--workers` count, crops
             resized by the host and on the device, and the whole machine's
             busy CPU-ms per image (/proc/stat).
  memory     RSS of each grain worker (and of the training process) after
             a few steps, for the small and the big tree; the pickled size of
             the file table the workers receive.
  start-up   opening the big tree's source (listing, or reading the index)
             and the first batch (spawning the workers), cold and from the
             index; and `benchmarks.listing`'s rows (scandir vs pathlib).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from configs import default
from moco_jax import data
from moco_jax.data.pipelines import crop_rule, grain, pillow_ops
from moco_jax.data.sources import file_index, image_folder
from moco_jax.training import trainer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = 1000


def make_photos(root: Path, count: int, seed: int = 0, sources: Path = SHARED / "imagenette_sample" / "train"
                ) -> list[Path]:
    """`count` ImageNet-sized JPEGs (500 x 375, every fourth 375 x 500,
    about 110 KB) in root/<class>/, from the sample photos in
    `sources`/<class>/ (or, without them, smooth random fields) with
    Gaussian noise of sigma 10."""
    sources = sorted(Path(sources).glob("*/*.JPEG"))
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = (375, 500) if i % 4 == 0 else (500, 375)
        if sources:
            base = Image.open(sources[i % len(sources)]).convert("RGB").resize((w, h), Image.BICUBIC)
        else:
            base = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), np.uint8)).resize((w, h),
                                                                                                  Image.BICUBIC)
        noisy = np.asarray(base, np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
        path = root / f"n{i % CLASSES:08d}" / f"photo_{i:07d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def make_tree(root: Path, photos: list[Path], count: int) -> Path:
    """root/train/<class>/ with `count` symbolic links to `photos`, over
    1,000 classes."""
    train = root / "train"
    for c in range(CLASSES):
        (train / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        os.symlink(photos[i % len(photos)], train / f"n{i % CLASSES:08d}" / f"img_{i:08d}.JPEG")
    return root


# --------------------------------------------------------------------------
# CPU per image, in one thread.
# --------------------------------------------------------------------------
def _cpu_ms(fn, items, reps: int) -> float:
    """Best of `reps` CPU-ms per item of fn over items."""
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        for item in items:
            fn(item)
        best = min(best, (time.process_time() - start) / len(items) * 1000)
    return best


def cpu_rows(photos: list[Path], reps: int) -> list[dict]:
    files = image_folder.FileImages(np.asarray([str(p) for p in photos]))
    encoded = [p.read_bytes() for p in photos]
    rows = []
    decoders = [("simplejpeg", pillow_ops.simplejpeg), ("Pillow", None)]
    for decoder, module in decoders:
        if decoder == "simplejpeg" and module is None:
            print("skipping the simplejpeg rows: simplejpeg is not installed")
            continue
        saved, pillow_ops.simplejpeg = pillow_ops.simplejpeg, module
        try:
            for scale in ((0.2, 1.0), (0.08, 1.0)):
                rows.append(dict(decoder=decoder, crop_scale=scale, **_cpu_parts(files, encoded, scale, reps)))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            pillow_ops.simplejpeg = saved
    return rows


def _cpu_parts(files, encoded: list[bytes], scale, reps: int, size: int = 224, step: int = 64) -> dict:
    n = len(encoded)
    steps = [np.arange(s, min(n, s + step)) for s in range(0, n, step)]
    u = pillow_ops.stream_uniforms(0, np.arange(n), 2)

    def whole(ix):
        grain.random_crops(files, ix, u[ix], size, scale, labelled=False, read_threads=0)

    slot = (grain.SLOT_SIDES * size) ** 2

    def decoded_into_slots(ix):  # resize_on_device: the host decodes, the accelerator cuts and resizes
        element = grain.random_crops(files, ix, u[ix], size, scale, labelled=False, read_threads=0, slot=slot)
        resized_here.append(int((element["views"][..., 1] == size).sum()))  # boxes the host resized

    resized_here = []
    total = _cpu_ms(whole, steps, reps) * len(steps) / n
    on_device = _cpu_ms(decoded_into_slots, steps, reps) * len(steps) / n
    opened = [pillow_ops.open_image(e) for e in encoded]
    boxes = [crop_rule.crop_boxes(u[i], o.height, o.width, scale) for i, o in enumerate(opened)]
    fractions = [size / float(b[:, 2:].min()) for b in boxes]
    decoded = [pillow_ops.decode(pillow_ops.open_image(e), f)[0] for e, f in zip(encoded, fractions)]

    def crops(i):  # pillow_ops.crops_into after its decode
        sx, sy = decoded[i].size[0] / opened[i].width, decoded[i].size[1] / opened[i].height
        for top, left, h, w in boxes[i].tolist():
            window = (round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy))
            np.asarray(decoded[i].crop(window).resize((size, size), Image.BILINEAR))

    def decode_at(reduce_by):  # a JPEG decoded in the DCT domain at 1/reduce_by of its size
        return lambda i: pillow_ops.decode(pillow_ops.open_image(encoded[i]), 0.9 / reduce_by)

    return dict(
        cpu_ms_per_image=total,
        resize_on_device_cpu_ms_per_image=on_device,
        speedup=total / on_device,
        boxes_resized_by_the_host=float(np.sum(resized_here[-len(steps):])) / (2 * n),
        bytes_per_image=dict(host_resize=2 * size * size * 3, resize_on_device=slot * 3),
        read_ms=_cpu_ms(lambda i: files.read(i), range(n), reps),
        header_ms=_cpu_ms(lambda e: pillow_ops.open_image(e), encoded, reps),
        decode_ms=_cpu_ms(lambda i: pillow_ops.decode(pillow_ops.open_image(encoded[i]), fractions[i]),
                          range(n), reps),
        crops_and_resizes_ms=_cpu_ms(crops, range(n), reps),
        decode_ms_at_reduction={f"1/{r}": _cpu_ms(decode_at(r), range(n), reps) for r in (1, 2, 4, 8)},
        reduced_decodes=float(np.mean([d.size[0] < o.width for d, o in zip(decoded, opened)])),
        mean_kb=float(np.mean([len(e) for e in encoded]) / 1024))


# --------------------------------------------------------------------------
# What the accelerator does more when it resizes.
# --------------------------------------------------------------------------
def device_row(photos: list[Path], pairs: int = 16, size: int = 224, reps: int = 3) -> dict:
    """The step's views function (`augment.make_views_fn`, MoCo v2 recipe) on
    `pairs` real pairs: XLA's FLOPs and bytes accessed per pair, and its time
    here, given the host's crops and given slots (the cut and resize moved
    to the device)."""
    import jax

    from benchmarks.train_step import cost_flops
    from moco_jax.core import augment

    files = image_folder.FileImages(np.asarray([str(p) for p in photos[:pairs]]))
    ix, u = np.arange(pairs), pillow_ops.stream_uniforms(0, np.arange(pairs), 2)
    crops = grain.random_crops(files, ix, u, size, (0.2, 1.0), labelled=False, read_threads=0)["crops"]
    slotted = grain.random_crops(files, ix, u, size, (0.2, 1.0), labelled=False, read_threads=0,
                                 slot=(grain.SLOT_SIDES * size) ** 2)
    views = augment.make_views_fn(augment.moco_v2_recipe(size), host_cropped=True)
    row = dict(pairs=pairs, device=str(jax.devices()[0]))
    for name, batch in (("host_crops", crops), ("slots", (slotted["slots"], slotted["views"]))):
        compiled = jax.jit(views).lower(jax.random.key(0), batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        jax.block_until_ready(compiled(jax.random.key(0), batch))
        best = float("inf")
        for r in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(jax.random.key(r), batch))
            best = min(best, time.perf_counter() - start)
        row[name] = dict(gflops_per_pair=(cost_flops(cost) or float("nan")) / pairs / 1e9,
                         mb_accessed_per_pair=float(cost.get("bytes accessed", float("nan"))) / pairs / 1e6,
                         ms_per_pair_here=1000 * best / pairs)
    return row


# --------------------------------------------------------------------------
# Throughput and memory through the trainer's pipeline.
# --------------------------------------------------------------------------
def _config(root: Path, workers: int, threads: int, batch: int, resize_on_device: bool = True):
    config = default.get_config()
    config.update(dict(dataset="image_folder", data_dir=str(root), train_split="train", crop_size=224,
                       crop_scale=(0.2, 1.0), batch_size=batch, input_workers=workers, input_threads=threads,
                       resize_on_device=resize_on_device))
    return config


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        for child in map(int, text):
            found += [child] + _children(child)
    return found


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scaling_rows(root: Path, workers_list: list[int], steps: int, batch: int) -> list[dict]:
    rows = []
    for workers in workers_list:
        for resize_on_device in (False, True):
            threads = 1 if workers else (os.cpu_count() or 2)
            config = _config(root, workers, threads, batch, resize_on_device)
            batches = trainer.pretrain_batches(data.open_source(config), config, start_step=0)
            for _ in range(3):
                next(batches)
            busy, wall = _busy_cpu_seconds(), time.perf_counter()
            for _ in range(steps):
                next(batches)
            wall, busy = time.perf_counter() - wall, _busy_cpu_seconds() - busy
            batches.close()
            rows.append(dict(workers=workers, threads=threads, batch=batch, resize_on_device=resize_on_device,
                             images_per_s=steps * batch / wall, busy_cpu_ms_per_image=1000 * busy / (steps * batch),
                             load_average=os.getloadavg()[0]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_row(root: Path, files: int, workers: int, batch: int) -> dict:
    """RSS after a few steps with `workers` workers, and start-up times:
    the source opened (listing, or the index) and the first batch."""
    config = _config(root, workers, 1, batch)
    start = time.perf_counter()
    source = data.open_source(config)
    opened_s = time.perf_counter() - start
    batches = trainer.pretrain_batches(source, config, start_step=0)
    next(batches)
    first_batch_s = time.perf_counter() - start
    for _ in range(3):
        next(batches)
    children = _children(os.getpid())
    worker_rss = sorted(_rss_mb(pid) for pid in children if "grain" in _cmdline(pid) or "spawn" in _cmdline(pid))
    row = dict(files=files, workers=workers, open_source_s=opened_s, first_batch_s=first_batch_s,
               worker_rss_mb=worker_rss, training_process_rss_mb=_rss_mb(os.getpid()),
               pickled_file_images_bytes=len(pickle.dumps(image_folder.FileImages(source.files))),
               pickled_path_array_bytes=len(pickle.dumps(source.files.path_array())))
    batches.close()
    return row


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=512,
                        help="distinct ImageNet-sized JPEGs to make (a multiple of 64)")
    parser.add_argument("--small", type=int, default=20_000, help="files of the small tree")
    parser.add_argument("--big", type=int, default=130_000, help="files of the big tree")
    parser.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")],
                        default=[0] + list(range(1, (os.cpu_count() or 2) + 1)))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per scaling row")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each CPU row (the best counts)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: cpu,device,scaling,memory")
    parser.add_argument("--workdir", type=Path, help="where the stand-ins go (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--sources", type=Path, default=SHARED / "imagenette_sample" / "train",
                        help="the sample photos, <class>/*.JPEG (e.g. a copy carried to a GPU machine)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    from benchmarks import input_pipeline, listing
    result = dict(environment=input_pipeline.environment(), cpu=[], device={}, scaling=[], memory=[], listing=[])
    result["environment"]["simplejpeg"] = getattr(pillow_ops.simplejpeg, "__version__", None)
    print(json.dumps(result["environment"]), flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imagenet_host-"))
    try:
        photos = make_photos(work / "photos", args.photos, sources=args.sources)
        result["environment"]["photos_from"] = str(args.sources) if any(args.sources.glob("*/*.JPEG")) else "noise"
        if "cpu" not in skip:
            result["cpu"] = cpu_rows(photos, args.reps)
        small = make_tree(work / "small", photos, args.small)
        if "scaling" not in skip:
            result["scaling"] = scaling_rows(small, args.workers, args.steps, args.batch)
        if "memory" not in skip:
            big = make_tree(work / "big", photos, args.big)
            workers = max(1, min(2, max(args.workers)))
            for root, files in ((small, args.small), (big, args.big)):
                shutil.rmtree(root / file_index.INDEX_FOLDER, ignore_errors=True)
                for attempt in ("listed (no index yet)", "from the index"):
                    result["memory"].append(dict(memory_row(root, files, workers, args.batch), index=attempt))
                    print(json.dumps(result["memory"][-1]), flush=True)
            result["listing"] = listing.listing_rows(work / "listing", sizes=(args.small, args.big))
            for row in result["listing"]:
                print(json.dumps(row), flush=True)
        if "device" not in skip:  # last: its compiled functions would count in the training process's RSS
            result["device"] = device_row(photos)
            print(json.dumps(result["device"]), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

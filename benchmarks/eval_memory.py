"""Host memory and time of the evaluation programs over image folders of two
sizes: does a process's memory grow with the dataset?

  python -m benchmarks.eval_memory --out /tmp/eval_memory                      # 2,000 and 20,000: ~5 min, 2 cores
  python -m benchmarks.eval_memory --out /tmp/eval_memory --sizes 500 --steps 20 --no_old --no_decode
  python -m benchmarks.eval_memory --sizes 2000,20000,40000 --programs "linear features,knn" --no_decode

For each size N it builds (once; reused when --out already has it) an
ImageNet-style folder `<out>/n<N>/{train,val}/<wnid>/img_<i>.jpg`: N train
and N/10 val images, hard links (copies where linking fails) of the real
ImageNet photos of ../shared/data/imagenette_sample (224 px JPEGs, 10
classes), each under a new name in the class folder of its photo, the
sample's train photos for train and its val photos for val, cycled. A tiny
encoder (ResNet-10 of width 4, ImageNet stem, random weights, so that
decoding dominates) is exported once as a flax .msgpack; then each program
runs in a fresh subprocess, one after the other:

  linear full      python -m moco_jax.linear_eval --config.mode=full, --steps steps
                   of 256 augmented images (RandomResizedCrop), then the val split
  linear features  the same with --config.mode=features: the features of every
                   train and val image extracted into <workdir>/features, then
                   --steps classifier steps on them
  knn              python -m moco_jax.knn_eval, the whole train split as the bank
  old arrays       `data.open_source(...).labelled_arrays(size=256)`: what the
                   programs did before streaming (every image decoded into one
                   host array); not with --no_old
  decode 224 eval / train   the grain pipeline alone at 224 px, over
                   --decode_images (2,000) train images of the largest folder:
                   `eval_batches` (Resize(256) + CenterCrop(224)) and
                   `labelled_train_batches` (RandomResizedCrop 224), CPU ms per
                   image for the projection; not with --no_decode

Memory: the peak RSS of the process tree, the program plus any child
processes (grain worker processes: `input_workers`, none by default on a
2-core machine): /proc/<pid>/status of the process and of every descendant
(found through /proc/<pid>/task/*/children) read every --poll seconds
(0.05), VmRSS summed over the tree (shared pages count once per process);
the peak of RssAnon (heap, arrays: what the old code's arrays were) is
reported beside it, since RssFile counts the memory-mapped feature cache and
libraries, pages the kernel can drop. maxrss_mib is the exact peak of the
largest single process from os.wait4's rusage (the polled sum cannot miss a
peak longer than the polling interval; this one cannot miss any). CPU
seconds are wait4's user + system time of the program and its reaped
children. On a CPU the JAX "devices" are host memory too, so the kNN bank
(N x feature width x 4 B, on a GPU in device memory) is in the RSS here.

Prints one table row per (size, program) and the ImageNet-1k projection;
--json writes the rows.
"""

from __future__ import annotations

import argparse
import datetime
import glob
from importlib import metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "imagenette_sample"
MIB = 2**20

# ImageNet-1k, for the projection.
IMAGENET_TRAIN, IMAGENET_VAL, R50_DIM = 1_281_167, 50_000, 2048


# ---------------------------------------------------------------------------
# The image folders.
# ---------------------------------------------------------------------------
def sample_photos(sample: Path, split: str) -> list[tuple[str, Path]]:
    """(class folder name, photo) of every JPEG of the sample's `split`, sorted."""
    photos = sorted((p.parent.name, p) for p in (sample / split).glob("*/*")
                    if p.suffix.lower() in (".jpg", ".jpeg"))
    if not photos:
        raise SystemExit(f"no JPEGs in {sample / split}: the ImageNet sample photos are missing "
                         "(see ../shared/data/README.md)")
    return photos


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def build_split(folder: Path, photos: list[tuple[str, Path]], count: int) -> None:
    """`count` images in folder/<class>/img_<i>.jpg, photo i % len(photos)."""
    for i in range(count):
        wnid, photo = photos[i % len(photos)]
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        _link(photo, folder / wnid / f"img_{i:07d}.jpg")


def build_folder(out: Path, train: int, val: int, sample: Path = SAMPLE) -> Path:
    """`out/n<train>/{train,val}/<wnid>/*.jpg`, made once: reused when its
    marker file records the same counts."""
    root = out / f"n{train}"
    marker = root / "built.json"
    want = {"train": train, "val": val, "sample": str(sample)}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    build_split(root / "train", sample_photos(sample, "train"), train)
    build_split(root / "val", sample_photos(sample, "val"), val)
    marker.write_text(json.dumps(want))
    return root


def export_encoder(path: Path, crop_size: int, data_dir: Path) -> Path:
    """A tiny random encoder (ResNet-10, width 4, ImageNet stem) whose
    pretraining config reads the image folder `data_dir` at `crop_size`,
    written by a child process (this one never imports JAX: a child's
    maxrss starts at its parent's RSS at the fork)."""
    if not path.exists():
        subprocess.run([sys.executable, "-m", "benchmarks.eval_memory", "--child", "export", str(data_dir),
                        str(path), str(crop_size)], cwd=ROOT, env=child_env(), check=True)
    return path


def child_export(data_dir: str, path: str, crop_size: int) -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from configs import default  # noqa: PLC0415
    from moco_jax import methods  # noqa: PLC0415
    from moco_jax.io import formats  # noqa: PLC0415

    config = default.get_config()
    config.update(dict(dataset="image_folder", data_dir=data_dir, eval_split="val", image_size=crop_size,
                       crop_size=crop_size, knn_center_crop_fraction=0.875, embed_dim=128))
    config.model.update(dict(depth=10, width=4, stem="imagenet"))
    encoder = methods.build_encoder(config)
    variables = encoder.init(jax.random.key(0), jnp.zeros((1, crop_size, crop_size, 3)), train=False)
    formats.write_flax(path, config, variables)


# ---------------------------------------------------------------------------
# Measuring a process tree.
# ---------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for children in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(children) as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of one process, in KiB ({} once it is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0])
    except OSError:
        return {}
    return fields


def measure(command: list[str], env: dict, poll: float, log: Path) -> dict:
    """Run `command`; its tree's peak RSS (polled), wait4's maxrss and CPU
    time, wall time, the most processes seen at once."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        most = 1
        while True:
            tree = descendants(proc.pid)
            most = max(most, len(tree))
            total = {k: 0 for k in peak}
            for p in tree:
                for k, v in memory_kib(p).items():
                    total[k] += v
            for k in peak:
                peak[k] = max(peak[k], total[k])
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(poll)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}); the end of {log}:\n{tail}")
    return {"peak_rss_mib": peak["VmRSS"] / 1024, "peak_anon_mib": peak["RssAnon"] / 1024,
            "peak_file_mib": peak["RssFile"] / 1024, "maxrss_mib": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "processes": most}


def child_env() -> dict:
    """The programs' environment: one JAX CPU device (no emulated devices)
    and no persistent compilation cache, so every run compiles alike."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    return env


def du_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def step_time_ms(workdir: Path) -> float | None:
    """The mean step_time_ms of the probe's log intervals after the first
    (which holds the compilation), from its metrics.jsonl."""
    try:
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    except OSError:
        return None
    times = [r["step_time_ms"] for r in rows if "step_time_ms" in r][1:]
    return sum(times) / len(times) if times else None


# ---------------------------------------------------------------------------
# Children run by this module itself (--child ...).
# ---------------------------------------------------------------------------
def child_old_arrays(root: str) -> None:
    """The old programs' first act: every labelled image decoded at 256 px."""
    from moco_jax import data  # noqa: PLC0415

    spec = data.SourceConfig("image_folder", data_dir=root, eval_split="val")
    arrays = data.open_source(spec).labelled_arrays(size=256)
    print(json.dumps({"train_images": len(arrays.train_labels), "bytes": arrays.train_images.nbytes
                      + arrays.test_images.nbytes}))


def child_decode(root: str, kind: str, crop: int, batch: int, images: int) -> None:
    """The grain pipeline alone over `images` images of the train split at
    `crop` px: their eval view (kind 'eval') or the probe's training crops
    (kind 'train'); CPU time of this process (all its
    threads) per image, after one warm-up batch."""
    from moco_jax import data  # noqa: PLC0415

    spec = data.SourceConfig("image_folder", data_dir=root, eval_split="val")
    source = data.open_source(spec)
    if kind == "eval":
        stream = source.eval_batches(split="train", size=crop, crop_fraction=0.875, global_batch=batch)
    else:
        stream = source.labelled_train_batches(global_batch=batch, seed=0, crop_size=crop)
    next(stream)
    wall, cpu, done = time.perf_counter(), time.process_time(), 0
    for batch_images, _, *valid in stream:
        done += int(valid[0].sum()) if valid else batch_images.shape[0] * batch_images.shape[1]
        if done >= images:
            break
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"images": done, "cpu_ms_per_image": 1000 * cpu / done, "wall_ms_per_image": 1000 * wall / done}))


def last_json(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------
def run_size(args, n: int, encoder: Path) -> list[dict]:
    val = max(1, n // 10)
    root = build_folder(args.out, n, val)
    env, rows = child_env(), []
    common = [f"--pretrained={encoder}", "--config.dataset=image_folder", f"--config.data_dir={root}",
              "--config.eval_split=val", f"--config.num_train_steps={args.steps}",
              f"--config.log_every_steps={max(1, args.steps // 5)}",
              f"--config.checkpoint_every_steps={args.steps}", f"--config.input_workers={args.input_workers}"]
    programs = []
    for mode in ("full", "features"):
        workdir = args.out / "work" / f"n{n}_{mode}"
        shutil.rmtree(workdir, ignore_errors=True)
        images = (args.steps * 256 if mode == "full" else n) + val
        programs.append((f"linear {mode}", [sys.executable, "-m", "moco_jax.linear_eval", *common,
                                            f"--config.mode={mode}", f"--workdir={workdir}"], images, workdir))
    programs.append(("knn", [sys.executable, "-m", "moco_jax.knn_eval", f"--pretrained={encoder}",
                             f"--data_dir={root}"], n + val, None))
    if not args.no_old:
        programs.append(("old arrays (256 px)", [sys.executable, "-m", "benchmarks.eval_memory", "--child",
                                                 "old_arrays", str(root)], n + val, None))
    if not args.no_decode and n == max(args.sizes):  # once: the cost per image does not depend on N
        for kind in ("eval", "train"):
            count = min(n, args.decode_images)
            programs.append((f"decode 224 {kind}", [sys.executable, "-m", "benchmarks.eval_memory", "--child",
                                                    f"decode_{kind}", str(root), "224", str(count)], count, None))
    if args.programs:
        programs = [p for p in programs if p[0].split()[0] in args.programs or p[0] in args.programs]
    for name, command, images, workdir in programs:
        slug = "_".join(name.replace("(", "").replace(")", "").split())
        log = args.out / "logs" / f"n{n}_{slug}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        m = measure(command, env, args.poll, log)
        row = {"train_images": n, "val_images": val, "program": name, "images_processed": images, **m,
               "wall_ms_per_image": 1000 * m["wall_s"] / images, "cpu_ms_per_image": 1000 * m["cpu_s"] / images}
        if workdir is not None:
            row["step_time_ms"] = step_time_ms(workdir)
            if (workdir / "features").is_dir():
                row["features_cache_bytes"] = du_bytes(workdir / "features")
        if name.startswith("old"):
            row["arrays_bytes"] = last_json(log)["bytes"]
        if name.startswith("decode"):
            decoded = last_json(log)
            row["images_processed"] = decoded.pop("images")
            row.update(decoded)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| train images | program | images processed | peak RSS MiB (tree) | peak RssAnon MiB | maxrss MiB "
            "| wall s | CPU s | wall ms / image | CPU ms / image | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        notes = []
        if r.get("step_time_ms"):
            notes.append(f"{r['step_time_ms']:.0f} ms / step of 256 (steady)")
        if "features_cache_bytes" in r:
            notes.append(f"features cache {r['features_cache_bytes'] / MIB:.2f} MiB on disk")
        if "arrays_bytes" in r:
            notes.append(f"arrays {r['arrays_bytes'] / MIB:.0f} MiB")
        if "cpu_ms_per_image" in r and r["program"].startswith("decode"):
            notes = [f"pipeline alone: {r['cpu_ms_per_image']:.2f} CPU ms, {r['wall_ms_per_image']:.2f} wall ms "
                     "per image (after warm-up)"]
        if r["processes"] > 1:
            notes.append(f"{r['processes']} processes")
        lines.append(f"| {r['train_images']:,} | {r['program']} | {r['images_processed']:,} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} | {r['maxrss_mib']:.0f} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['wall_ms_per_image']:.2f} | "
                     f"{r['cpu_ms_per_image']:.2f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def projection(rows: list[dict], cores: tuple[int, ...]) -> str:
    """ImageNet-1k on one 8-GPU host, from the measured rows."""
    by = {(r["train_images"], r["program"]): r for r in rows}
    sizes = sorted({r["train_images"] for r in rows})
    lines = ["ImageNet-1k projection (1,281,167 train / 50,000 val images, one 8-GPU host):"]
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        for program in ("linear full", "linear features", "knn", "old arrays (256 px)"):
            if (small, program) in by and (large, program) in by:
                a, b = by[(small, program)], by[(large, program)]
                lines.append(f"- {program}: peak RSS {a['peak_rss_mib']:.0f} -> {b['peak_rss_mib']:.0f} MiB "
                             f"(RssAnon {a['peak_anon_mib']:.0f} -> {b['peak_anon_mib']:.0f}) from {small:,} to "
                             f"{large:,} train images")
    cache = (IMAGENET_TRAIN + IMAGENET_VAL) * R50_DIM * 4
    lines.append(f"- features cache on disk (ResNet-50, 2048 float32): ({IMAGENET_TRAIN:,} + {IMAGENET_VAL:,}) x "
                 f"2048 x 4 B = {cache / 1e9:.1f} GB ({cache / 2**30:.1f} GiB), one shard per process")
    old = IMAGENET_TRAIN * 256 * 256 * 3
    lines.append(f"- old code: {IMAGENET_TRAIN:,} x 256 x 256 x 3 B = {old / 1e9:.0f} GB of decoded train "
                 f"images per process (+ {IMAGENET_VAL * 256 * 256 * 3 / 1e9:.1f} GB val), decoded once")
    paths = IMAGENET_TRAIN * 4 * len("/data/imagenet/train/n01440764/n01440764_10026.JPEG")
    lines.append(f"- what still grows with N on the host: the file list, a numpy unicode array of 4 B per character: "
                 f"{paths / 1e6:.0f} MB for {IMAGENET_TRAIN:,} paths of 51 characters, per process and per grain "
                 "worker (workers get the dataset pickled)")
    decode = {kind: by.get((sizes[-1], f"decode 224 {kind}")) for kind in ("eval", "train")}
    for kind, images, what in (("train", IMAGENET_TRAIN, "full-mode epoch (RandomResizedCrop 224)"),
                               ("eval", IMAGENET_TRAIN + IMAGENET_VAL,
                                "one pass over train + val (Resize 256, CenterCrop 224): features extraction, kNN")):
        r = decode[kind]
        if r is None:
            continue
        per = r["cpu_ms_per_image"]
        times = ", ".join(f"{images * per / 1000 / c / 60:.1f} min on {c} cores" for c in cores)
        lines.append(f"- {what}: {per:.2f} CPU ms per image x {images:,} images = {images * per / 1000 / 3600:.2f} "
                     f"CPU hours of decoding: {times}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/eval_memory"), help="folders, workdirs and logs")
    parser.add_argument("--sizes", default="2000,20000", help="train images per folder (val: a tenth)")
    parser.add_argument("--crop", type=int, default=64, help="the encoder's crop size")
    parser.add_argument("--steps", type=int, default=300, help="linear probe steps (batch 256) in both modes")
    parser.add_argument("--input_workers", type=int, default=-1, help="grain worker processes (-1: automatic)")
    parser.add_argument("--decode_images", type=int, default=2000, help="images of the 224 px decode runs")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between /proc reads")
    parser.add_argument("--cores", default="16,96", help="host cores for the projection")
    parser.add_argument("--no_old", action="store_true", help="skip the old-code labelled_arrays run")
    parser.add_argument("--no_decode", action="store_true", help="skip the 224 px decode-only runs")
    parser.add_argument("--programs", type=lambda s: s.split(","), default=None,
                        help="only these, e.g. 'linear features,knn' (first words also match: linear, knn, old, "
                        "decode)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, root, *rest = args.child
        if kind == "old_arrays":
            child_old_arrays(root)
        elif kind == "export":
            child_export(root, rest[0], int(rest[1]))
        else:
            crop, images = int(rest[0]), int(rest[1])
            child_decode(root, kind.removeprefix("decode_"), crop, 256, images)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = args.sizes = [int(s) for s in args.sizes.split(",")]
    encoder = export_encoder(args.out / f"encoder_c{args.crop}.msgpack", args.crop,
                             build_folder(args.out, sizes[0], max(1, sizes[0] // 10)))
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("jax", "grain", "pillow", "numpy"))
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {versions}, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}, crop {args.crop}, {args.steps} probe steps", flush=True)
    rows = []
    for n in sizes:
        print(f"{n:,} train images: {build_folder(args.out, n, max(1, n // 10))}", flush=True)
        rows += run_size(args, n, encoder)
    print(table(rows))
    print()
    print(projection(rows, tuple(int(c) for c in args.cores.split(","))))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""How long listing an image folder takes, and what the listing costs in
memory, before and after the index (moco_jax/data/sources/file_index.py).

  python -m benchmarks.listing                       # 20,000 and 130,000 files, 1,000 classes: ~1 min
  python -m benchmarks.listing --sizes 1281167 --root /mnt/fast/tmp   # ImageNet's count

For each size N it creates (once; reused when the folder exists) N empty
files `<root>/n<N>/n<class>/img_<i>.JPEG` in `classes` class folders: only
names matter to a listing. Then each measurement runs in a fresh Python
process, so that one's memory does not hide in another's freed heap:

  pathlib       the listing before the index (kept below): `iterdir` and
                `is_file()`, a stat per file, into a numpy unicode array
  scandir       `file_index.list_folder`: `os.scandir`, class folders in
                parallel threads, no stat per file (the first call after
                creating the files: the directory entries are cached; nothing
                is dropped)
  signature     `file_index.folder_signature`: one stat per class folder
  write index   `file_index.write_index` of that listing
  read index    `file_index.open_table` of the written index, its length,
                and `path(i)` of every file (what an epoch of reads does)

Each row: seconds, the process's RSS growth over the measurement (MiB), and
for the index its file size and the pickled size of what grain workers
receive (`FileImages`), against the pickled numpy array of paths.
Prints one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def old_list_image_files(root) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The listing as moco_jax did it before the index: (paths str (N,),
    labels int32 (N,), class names)."""
    def images_in(folder: Path) -> list[str]:
        return sorted(str(p) for p in folder.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)

    root = Path(root)
    paths = images_in(root)
    labels, classes = [-1] * len(paths), []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = images_in(sub)
        if files:
            labels += [len(classes)] * len(files)
            paths += files
            classes.append(sub.name)
    return np.asarray(paths), np.asarray(labels, np.int32), tuple(classes)


def make_tree(folder: Path, n: int, classes: int) -> Path:
    """n empty files in `classes` class folders (ImageNet-like names), once."""
    done = folder / ".complete"
    if done.exists():
        return folder
    for i in range(n):
        cls = folder / f"n{i % classes:08d}"
        if i < classes:
            cls.mkdir(parents=True, exist_ok=True)
        (cls / f"n{i % classes:08d}_{i:07d}.JPEG").touch()
    done.touch()
    return folder


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, folder: str, index_dir: str) -> dict:
    """One measurement, in this (fresh) process."""
    from moco_jax.data.sources import file_index, image_folder

    before = rss_mib()
    start = time.perf_counter()
    row: dict = {}
    if kind == "pathlib":
        paths, labels, classes = old_list_image_files(folder)
        row["paths_array_mib"] = paths.nbytes / 2 ** 20
        row["pickled_paths_mib"] = len(pickle.dumps((paths, labels))) / 2 ** 20  # what FileImages pickled
        kept = (paths, labels)
    elif kind == "scandir":
        kept = file_index.list_folder(folder)
    elif kind == "signature":
        kept = file_index.folder_signature(folder)
    elif kind == "write index":
        listing = file_index.list_folder(folder)
        start = time.perf_counter()
        os.makedirs(index_dir, exist_ok=True)
        path = file_index.index_path(index_dir, folder, file_index.folder_signature(folder))
        file_index.write_index(path, listing, "benchmark")
        row["index_mib"] = os.path.getsize(path) / 2 ** 20
        kept = listing
    elif kind == "read index":
        table = file_index.open_table(folder, index_dir)
        total = sum(len(table.path(i)) for i in range(len(table)))
        row["path_chars"] = total
        row["pickled_file_images_bytes"] = len(pickle.dumps(image_folder.FileImages(table, labelled=True)))
        kept = table
    else:
        raise ValueError(kind)
    row.update(seconds=time.perf_counter() - start, rss_growth_mib=rss_mib() - before)
    del kept
    return row


def listing_rows(root_tmp, sizes=(20_000, 130_000), classes=1000) -> list[dict]:
    """One dict per (size, measurement): see the module docstring."""
    root_tmp = Path(root_tmp)
    rows = []
    repo = Path(__file__).resolve().parents[1]
    for n in sizes:
        folder = make_tree(root_tmp / f"n{n}", n, classes)
        index_dir = str(root_tmp / f"index{n}")
        for kind in ("pathlib", "scandir", "signature", "write index", "read index"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.listing", "--child", kind, str(folder), index_dir],
                                 cwd=repo, capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(repo)})
            rows.append({"files": n, "classes": classes, "measure": kind,
                         **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,130000")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--root", default="", help="where to create the folders ('' = a temporary folder)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FOLDER", "INDEX_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    sizes = tuple(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(dir=args.root or None, prefix="listing_") as tmp:
        for row in listing_rows(args.root or tmp, sizes, args.classes):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

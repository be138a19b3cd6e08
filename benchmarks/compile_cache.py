"""What the persistent compilation cache saves a relaunch: the training
step's compile time (trace + lower + compile, `benchmarks.train_step`'s
"compile s") in a fresh process with an empty cache, then in a second fresh
process reading that cache, as a relaunched or preempted run would.

  python -m benchmarks.compile_cache                                  # R18 CIFAR, R50 224 px on this machine
  python -m benchmarks.compile_cache --models vitb16_224 --local_batch 16 --json /tmp/cache.json

Each launch is `python -m benchmarks.train_step --models M --steps 1
--warmup 0` with JAX_COMPILATION_CACHE_DIR set to a new folder (what
train.py's default `--compilation_cache=auto` does with ~/.cache/moco_jax/xla
on a GPU or TPU, and `--compilation_cache=DIR` on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compile_seconds(model: str, dtype: str, cache: Path, local_batch: int | None) -> float:
    """The step's compile seconds in a new process using `cache`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        args = [sys.executable, "-m", "benchmarks.train_step", "--models", model, "--dtypes", dtype, "--steps", "1",
                "--warmup", "0", "--json", str(out)]
        if local_batch:
            args += ["--local_batch", str(local_batch)]
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache))
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args[1:])} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return float(json.loads(out.read_text())["rows"][0]["compile_s"])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="r18_cifar32,r50_224", help="comma-separated benchmarks.train_step models")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--local_batch", type=int, default=None, help="images per device (default: per model)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as cache:
            cold = compile_seconds(model, args.dtype, Path(cache), args.local_batch)
            warm = compile_seconds(model, args.dtype, Path(cache), args.local_batch)
            entries = len(os.listdir(cache))
        rows.append(dict(model=model, dtype=args.dtype, local_batch=args.local_batch, cold_compile_s=cold,
                         warm_compile_s=warm, cache_entries=entries))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

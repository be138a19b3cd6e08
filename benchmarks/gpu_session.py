"""One GPU lease, prepared: what only a GPU can show, within a time budget
(8 minutes by default), written as JSON and as a Markdown table.

  python -m benchmarks.gpu_session --out OUT                 # on the GPU machine
  python -m benchmarks.gpu_session --smoke --out /tmp/smoke  # the same code at tiny sizes, on a CPU

Phases, most important first; each runs in a process of its own (a row that
runs out of memory loses only its phase), bounded by what is left of
`--budget`; a phase with too little time left is skipped and says so:

  official  facebookresearch/moco's MoCo v2 step (benchmarks/official_moco.py:
            builder.py at commit 3402035, torchvision resnet50, bf16 autocast,
            channels_last), 256 images per device, K=65,536;
  v2        moco_jax's MoCo v2 ResNet-50 step at 224 px (K=65,536, 256 per
            device: the official row's batch), bf16, with the largest
            per-device batch that fits (`--fit`);
  v3        MoCo v3 ViT-B/16 and ResNet-50 (bf16) with and without
            rematerialisation (`model.remat`);
  v3_512    the same at 512 pairs per device (the recipes' batch of 4,096 on
            8 GPUs), rematerialised: does it fit, and its peak memory;
  host      the host input pipeline on all cores (benchmarks/imagenet_host.py:
            CPU-ms per image, images/s by workers, the views function on the
            device) on ImageNet-sized JPEGs made from the sample photos
            (`--photos_dir`, a few MB carried with the checkout);
  v2_more   the ResNet-50 step in fp32 (and bf16 again, in a process of
            its own: its peak memory), the CIFAR ResNet-18 in both;
  vits      MoCo v3 ViT-S/16 (bf16);
  cifar     if time is left: the CIFAR-10 recipe (configs/moco_v2_cifar10.py)
            with its default `pytorch` convolution init, for what is left of
            the budget (resumable: its workdir keeps the checkpoints).

Where the files come from on the GPU machine (all git-ignored, carried):
.official/moco/builder.py (benchmarks/official_moco.py says how to fetch it),
.gpu_data/imagenette_sample/train (a copy of ../shared/data/imagenette_sample/train),
.data/cifar10 (../shared/data/cifar10's files). A missing one skips its phase.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESERVE_S = 15  # kept back from the budget for writing the tables
# --smoke checks the code, not the time: a busy CPU (the test suite's two workers) compiles slowly.
SMOKE_CAP_FACTOR = 5


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    cap_s: int  # the most this phase may take (less where less is left)
    argv: Callable[[argparse.Namespace, Path], Optional[list[str]]]  # None: skipped (a file is missing)
    output: str  # the JSON file the phase writes under OUT


def _train_step(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.train_step", *args]


def _official(a, out):
    if not (a.official_dir / "builder.py").is_file():
        return None
    sizes = ["--smoke"] if a.smoke else ["--local_batch", "256", "--queue_size", "65536"]
    return [sys.executable, "-m", "benchmarks.official_moco", *sizes, "--dtypes", "bfloat16",
            "--builder_dir", str(a.official_dir), "--json", str(out / "official.json")]


def _v2(a, out):
    if a.smoke:
        return _train_step("--models", "tiny", "--dtypes", "bfloat16", "--fit", "--memory_gib", "1",
                           "--steps", "2", "--warmup", "1", "--json", str(out / "v2.json"))
    return _train_step("--models", "r50_224", "--dtypes", "bfloat16", "--fit", "--steps", "20", "--warmup", "3",
                       "--json", str(out / "v2.json"))


def _v2_more(a, out):
    if a.smoke:
        return None  # the v2 phase's code
    return _train_step("--models", "r50_224,r18_cifar32", "--dtypes", "float32,bfloat16", "--steps", "20",
                       "--warmup", "3", "--json", str(out / "v2_more.json"))


def _v3(a, out):
    if a.smoke:  # (remat=blocks: the v3_512 phase)
        return _train_step("--models", "vit_test", "--dtypes", "bfloat16", "--steps", "2", "--warmup", "1",
                           "--json", str(out / "v3.json"))
    return _train_step("--models", "vitb16_224,r50v3_224", "--dtypes", "bfloat16", "--remat", "none,blocks",
                       "--steps", "10", "--warmup", "2", "--json", str(out / "v3.json"))


def _v3_512(a, out):
    models, batch = ("vit_test", "16") if a.smoke else ("vitb16_224,r50v3_224", "512")
    return _train_step("--models", models, "--dtypes", "bfloat16", "--remat", "blocks", "--local_batch", batch,
                       "--steps", "3", "--warmup", "1", "--json", str(out / "v3_512.json"))


def _host(a, out):
    if not any(a.photos_dir.glob("*/*.JPEG")):
        return None
    cores = os.cpu_count() or 2
    sizes = (["--photos", "64", "--workers", "0,1", "--steps", "2", "--batch", "16", "--skip", "memory,device"]
             if a.smoke else ["--photos", "256", "--workers", f"0,{cores // 2},{cores}", "--steps", "10",
                              "--skip", "memory"])
    return [sys.executable, "-m", "benchmarks.imagenet_host", *sizes, "--reps", "1", "--sources",
            str(a.photos_dir), "--json", str(out / "host.json")]


def _vits(a, out):
    if a.smoke:
        return None  # the v3 phase's code at the same tiny size
    return _train_step("--models", "vits16_224", "--dtypes", "bfloat16", "--steps", "10", "--warmup", "2",
                       "--json", str(out / "vits.json"))


def _cifar(a, out):
    if not a.cifar_dir.is_dir() or not any(a.cifar_dir.iterdir()):
        return None
    tiny = (["--config.num_train_steps=2", "--config.batch_size=16", "--config.queue_size=64",
             "--config.bn_splits=1", "--config.model.depth=10", "--config.model.width=4",
             "--config.knn_max_train_images=64", "--config.knn_every_epochs=0"] if a.smoke else [])
    return [sys.executable, "train.py", "--config", "configs/moco_v2_cifar10.py", "--workdir", str(a.cifar_workdir),
            "--config.dataset=cifar10_arrays", f"--config.data_dir={a.cifar_dir}", *tiny]


PHASES = (
    Phase("official", 75, _official, "official.json"),
    Phase("v2", 90, _v2, "v2.json"),
    Phase("v3", 150, _v3, "v3.json"),
    Phase("v3_512", 110, _v3_512, "v3_512.json"),
    Phase("host", 80, _host, "host.json"),
    Phase("v2_more", 120, _v2_more, "v2_more.json"),
    Phase("vits", 45, _vits, "vits.json"),
    Phase("cifar", 100_000, _cifar, ""),
)


def run_phase(phase: Phase, argv: list[str], seconds: float, out: Path, env: dict) -> dict:
    """Run one phase's command for at most `seconds`; its output goes to OUT/<name>.log."""
    start = time.monotonic()
    with open(out / f"{phase.name}.log", "w") as log:
        try:
            # SIGTERM first (train.py saves a checkpoint on it), then SIGKILL 20 s later.
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=seconds)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                status = f"stopped at its {seconds:.0f} s"
        except OSError as e:
            status = f"could not start: {e}"
    return {"phase": phase.name, "status": status, "seconds": round(time.monotonic() - start, 1),
            "command": " ".join(argv[1:] if argv[0] == sys.executable else argv)}


def environment() -> dict:
    """The machine: GPU (nvidia-smi), versions, date."""
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "cpu_count": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["gpu"] = query.stdout.strip()
    code = ("import json, platform, jax, jaxlib, flax, optax\n"
            "v = dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,"
            " flax=flax.__version__, optax=optax.__version__, devices=[str(d) for d in jax.devices()])\n"
            "try:\n import torch; v['torch'] = torch.__version__\nexcept ImportError: pass\n"
            "try:\n import torchvision; v['torchvision'] = torchvision.__version__\nexcept Exception: pass\n"
            "print(json.dumps(v))")
    versions = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    env.update(json.loads(versions.stdout.strip().splitlines()[-1]) if versions.returncode == 0 else
               {"versions_error": versions.stderr[-500:]})
    return env


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_rows(out: Path) -> list[dict]:
    """Every moco_jax step row the phases wrote, tagged with its phase."""
    rows = []
    for name in ("v2", "v2_more", "v3", "v3_512", "vits"):
        for row in (_read(out / f"{name}.json") or {}).get("rows", []):
            rows.append(dict(row, phase=name))
    return rows


def ratio_rows(steps: list[dict], official: list[dict]) -> list[dict]:
    """moco_jax / official pairs/s for each official row and the moco_jax
    ResNet-50 row of the same dtype and per-device batch."""
    ratios = []
    for ref in official:
        ours = [r for r in steps if r["model"] in ("r50_224", "tiny") and r["dtype"] == ref["dtype"]
                and r["local_batch"] == ref["local_batch"] and r["remat"] == "none"]
        if ours:
            ratios.append({"dtype": ref["dtype"], "local_batch": ref["local_batch"],
                           "official_pairs_per_s": ref["pairs_per_s"], "moco_jax_pairs_per_s": ours[0]["pairs_per_s"],
                           "ratio": ours[0]["pairs_per_s"] / ref["pairs_per_s"]})
    return ratios


def markdown(result: dict) -> str:
    """The session's tables."""
    from benchmarks import train_step

    env = result["environment"]
    lines = [f"# GPU session {env['date_utc']} UTC: {env.get('gpu', 'no GPU')}, jax {env.get('jax')}, "
             f"flax {env.get('flax')}, torch {env.get('torch', 'n/a')}", ""]
    lines += ["## Phases", "", "| phase | status | seconds | command |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['status']} | {p['seconds']} | `{p['command']}` |" for p in result["phases"]]
    if result["steps"]:
        lines += ["", "## moco_jax training step (benchmarks/train_step.py)", "",
                  train_step.format_table(result["steps"], ("phase",) + train_step.COLUMNS)]
    if result["official"]:
        lines += ["", "## The official MoCo v2 code on the same device (benchmarks/official_moco.py)", "",
                  "| code | encoder | dtype | local batch | K | pairs/s | step ms | peak GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['code']} | {r['encoder']} | {r['dtype']} | {r['local_batch']} | {r['queue_size']} | "
                  f"{r['pairs_per_s']:.1f} | {r['step_ms']:.1f} | {train_step._cell(r['peak_mem_gib'])} |"
                  for r in result["official"]]
        lines += ["", "| dtype | local batch | moco_jax pairs/s | official pairs/s | moco_jax / official |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['local_batch']} | {r['moco_jax_pairs_per_s']:.1f} | "
                  f"{r['official_pairs_per_s']:.1f} | **{r['ratio']:.2f}** |" for r in result["ratios"]]
    host = result["host"]
    if host:
        lines += ["", "## Host input pipeline (benchmarks/imagenet_host.py)", "",
                  "| decoder | crop scale | CPU-ms/image, host resizes | accelerator resizes |", "|---|---|---|---|"]
        lines += [f"| {r['decoder']} | {r['crop_scale']} | {r['cpu_ms_per_image']:.2f} | "
                  f"{r['resize_on_device_cpu_ms_per_image']:.2f} |" for r in host.get("cpu", [])]
        lines += ["", "| workers | resize on device | images/s | busy CPU-ms/image |", "|---|---|---|---|"]
        lines += [f"| {r['workers']} | {r['resize_on_device']} | {r['images_per_s']:.0f} | "
                  f"{r['busy_cpu_ms_per_image']:.2f} |" for r in host.get("scaling", [])]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON, the table and the logs go")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole session")
    parser.add_argument("--phases", default=",".join(p.name for p in PHASES), help="comma-separated, in order")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (what the test suite runs)")
    parser.add_argument("--official_dir", type=Path, default=REPO / ".official" / "moco")
    parser.add_argument("--photos_dir", type=Path, default=None,
                        help="sample photos, <class>/*.JPEG (default: .gpu_data/imagenette_sample/train, "
                             "else ../shared/data/imagenette_sample/train)")
    parser.add_argument("--cifar_dir", type=Path, default=None,
                        help="default: .data/cifar10, else ../shared/data/cifar10")
    parser.add_argument("--cifar_workdir", type=Path, default=None,
                        help="default: workdir_cifar_pytorch_init (smoke: under --out)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    carried = REPO / ".gpu_data" / "imagenette_sample" / "train"
    args.photos_dir = args.photos_dir or (carried if carried.is_dir() else SHARED / "imagenette_sample" / "train")
    args.cifar_dir = args.cifar_dir or next((d for d in (REPO / ".data" / "cifar10", SHARED / "cifar10")
                                             if d.is_dir()), REPO / ".data" / "cifar10")
    args.cifar_workdir = args.cifar_workdir or (args.out / "cifar_workdir" if args.smoke
                                                else REPO / "workdir_cifar_pytorch_init")
    unknown = set(args.phases.split(",")) - {p.name for p in PHASES}
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; known: {[p.name for p in PHASES]}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.monotonic()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    if not args.smoke:  # a rerun on the same machine compiles nothing (not on a CPU: compilation_cache.py)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    result = {"environment": environment(), "smoke": args.smoke, "phases": []}
    chosen = args.phases.split(",")
    for phase in (p for p in PHASES if p.name in chosen):
        left = args.budget - (time.monotonic() - start) - RESERVE_S
        cap = phase.cap_s * (SMOKE_CAP_FACTOR if args.smoke else 1)
        argv = phase.argv(args, out)
        if argv is None:
            result["phases"].append({"phase": phase.name, "status": "skipped: its files are not here", "seconds": 0,
                                     "command": ""})
        elif left < min(cap, 30):
            result["phases"].append({"phase": phase.name, "status": f"skipped: {max(left, 0):.0f} s left",
                                     "seconds": 0, "command": " ".join(argv[1:])})
        else:
            result["phases"].append(run_phase(phase, argv, min(cap, left), out, env))
        print(json.dumps(result["phases"][-1]), flush=True)
    result["steps"] = step_rows(out)
    result["official"] = _read(out / "official.json") or []
    result["ratios"] = ratio_rows(result["steps"], result["official"])
    result["host"] = _read(out / "host.json")
    (out / "gpu_session.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "gpu_session.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()

"""What `train.py` prints at the end of a run: the result, where it was
saved, and what to run next.

    kNN accuracy (k=200, T=0.1; bank: the train split, queries: the test split):
      backbone    random init  81.9%  ->  MoCo  90.0%
      projection  random init  77.2%  ->  MoCo  89.7%
    Saved in /home/me/runs/default:
      checkpoints/        step 660; relaunching the same command resumes (or says the run is complete)
      ...
    Next:
      python -m moco_jax.knn_eval --pretrained /home/me/runs/default
      ...
"""

from __future__ import annotations

import glob
import os
import shlex

from moco_jax.training import metrics


def knn_lines(config, result: dict) -> list[str]:
    """The kNN table: random init against the trained encoder, per feature."""
    split, size = config.knn_train_split or config.train_split, result.get("knn_bank")
    bank = f"{size} images of the {split} split" if size else f"the {split} split"
    head = (f"kNN accuracy (k={config.knn_k}, T={config.knn_temperature}; bank: {bank}, "
            f"queries: the {config.eval_split} split):")
    random, trained = result["knn_random"], result["knn_trained"]
    return [head] + [f"  {name:<10}  random init {random[name]:6.1%}  ->  MoCo {trained[name]:6.1%}"
                     for name in trained if name in random]


def workdir_lines(workdir: str, step: int) -> list[str]:
    """The files a run leaves in `workdir`, each with what it is for."""
    q = shlex.quote(workdir)
    files = [("checkpoints/", f"step {step}; relaunching the same command resumes (or says the run is complete)"),
             (metrics.JSONL_NAME, f"every logged step (curves: python -m moco_jax.plot --workdir {q})"),
             (metrics.FINAL_NAME, "the result above")]
    if glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        files.insert(2, ("events.out.tfevents.*", f"TensorBoard (tensorboard --logdir {q})"))
    width = max(len(name) for name, _ in files)
    return [f"Saved in {workdir}:"] + [f"  {name:<{width}}  {what}" for name, what in files]


def next_commands(workdir: str) -> list[str]:
    """What a user usually runs on a pretrained encoder."""
    q = shlex.quote(workdir)
    return ["Next:",
            f"  python -m moco_jax.knn_eval --pretrained {q}",
            f"  python -m moco_jax.linear_eval --pretrained {q} --config.mode=features   # quick linear probe",
            f"  python -m moco_jax.export --pretrained {q} --format torchvision --output encoder.safetensors"]


def final_summary(config, workdir: str | None, result: dict) -> str:
    """The text printed after a finished run (or a relaunch of one)."""
    lines = knn_lines(config, result)
    if workdir:
        lines += workdir_lines(workdir, result["step"]) + next_commands(workdir)
    else:
        lines.append("Nothing was saved (no --workdir): add --workdir DIR to keep the encoder.")
    return "\n".join(lines)

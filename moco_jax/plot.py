"""Plot a run's curves: `python -m moco_jax.plot --workdir W`.

Reads `W/metrics.jsonl` and writes one PNG per curve next to it (loss,
positive accuracy, learning rate, kNN accuracy), plus `curves.png` with all
of them. Works on a finished run or on one still training.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from moco_jax.core.errors import InputError, NotFoundError
from moco_jax.launch import cli
from moco_jax.training import metrics

# (file name, title, y label, metric keys)
PANELS = (
    ("loss.png", "InfoNCE loss", "loss", ("loss",)),
    ("accuracy.png", "Positive-key accuracy", "accuracy", ("top1", "top5")),
    ("learning_rate.png", "Learning rate", "learning rate", ("learning_rate",)),
    ("knn.png", "Weighted kNN accuracy", "accuracy", ("knn_backbone", "knn_projection")),
)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def read_records(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, or a one-line error naming
    what is missing or unreadable."""
    path = os.path.join(workdir, metrics.JSONL_NAME)
    if not os.path.isdir(workdir):
        raise NotFoundError(f"--workdir={workdir} does not exist; give the --workdir of a train.py run")
    if not os.path.isfile(path):
        raise NotFoundError(f"{workdir} has no {metrics.JSONL_NAME}: expected the --workdir of a train.py run "
                            "(it writes metrics.jsonl from its first log step on)")
    try:
        records = metrics.read_jsonl(workdir)
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise InputError(f"{path} is not a metrics log (expected one JSON object with a 'step' per line, as "
                         f"train.py writes): {type(e).__name__}: {e}") from None
    if not records:
        raise InputError(f"{path} holds no records yet: nothing to plot (train.py logs every log_every_steps)")
    return records


def plot_workdir(workdir: str) -> list[str]:
    """Write the PNGs for `workdir`; returns their paths (panels with no data
    yet, e.g. kNN before the first evaluation, are left out)."""
    records = read_records(workdir)
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = [p for p in PANELS if any(_series(records, k)[0] for k in p[3])]
    written = []
    overview, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.5), squeeze=False)
    for (name, title, ylabel, keys), overview_ax in zip(panels, axes[0]):
        fig, ax = plt.subplots(figsize=(6, 4))
        for target in (ax, overview_ax):
            for key in keys:
                steps, values = _series(records, key)
                if steps:
                    target.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
            target.set(title=title, xlabel="step", ylabel=ylabel)
            target.grid(alpha=0.3)
            target.legend()
        fig.tight_layout()
        path = os.path.join(workdir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    overview.tight_layout()
    path = os.path.join(workdir, "curves.png")
    overview.savefig(path, dpi=100)
    plt.close(overview)
    return written + [path]


def main(argv: Sequence[str]) -> None:
    del argv  # cli.run refuses extra arguments
    for path in plot_workdir(flags.FLAGS.workdir):
        print(path)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir (holds metrics.jsonl).", required=True)
    cli.run(main)

"""`python -m moco_jax.plot` turns a workdir's metrics.jsonl into PNG curves."""

import json
import subprocess
import sys

from PIL import Image


def test_plot_writes_one_png_per_curve(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(10, 110, 10):
            f.write(json.dumps({"step": step, "loss": 8 - step / 50, "top1": step / 200, "top5": step / 150,
                                "learning_rate": 0.06 * (1 - step / 100)}) + "\n")
            if step % 50 == 0:
                f.write(json.dumps({"step": step, "knn_backbone": step / 120, "knn_projection": step / 130}) + "\n")
    out = subprocess.run([sys.executable, "-m", "moco_jax.plot", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = {"loss.png", "accuracy.png", "learning_rate.png", "knn.png", "curves.png"}
    assert {p.split("/")[-1] for p in out.stdout.split()} == names
    for name in names:
        with Image.open(tmp_path / name) as image:
            width, height = image.size
            assert width > 300 and height > 200
            # A drawn curve, not an empty canvas: many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_plot_skips_a_torn_last_line(tmp_path):
    """A run killed mid-write leaves half a record at the end of the log."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 8 - s / 50}) + "\n" for s in (10, 20, 30))
                    + '{"step": 40, "lo')
    out = subprocess.run([sys.executable, "-m", "moco_jax.plot", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {p.split("/")[-1] for p in out.stdout.split()} == {"loss.png", "curves.png"}
    warnings = [line for line in out.stderr.splitlines() if "torn last line" in line]
    assert len(warnings) == 1 and str(path) in warnings[0], out.stderr

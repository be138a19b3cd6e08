"""The evaluation programs' host memory does not grow with the dataset: the
features-mode linear probe and knn_eval stream the labelled images (each
process decodes its share batch by batch) instead of decoding whole splits
into host arrays (the old `labelled_arrays`).

Each program runs in a fresh subprocess over a folder of N and one of 8N real
ImageNet photos (hard links to ../shared/data/imagenette_sample under new
names), and the peak RSS of its process tree (/proc polled every 50 ms,
`benchmarks.eval_memory.measure`) may grow by at most MARGIN_MIB. Holding the
700 + 70 extra images decoded at 256 px, as the old code did, costs 770 x
196,608 B = 144 MiB (its peak about twice that: the arrays are assembled
from chunks); the same measurement of `labelled_arrays` shows that growth, so
the margin would catch a program that holds the images. Memory only, never
time (BENCHMARKS.md, "Evaluation host memory", has the times).
"""

import sys

import pytest

from benchmarks import eval_memory
from image_files import imagenette_or_skip
from moco_jax.io import formats
from test_pretrained import random_variables
from tiny import tiny_config

N = 100  # train images of the small folder (val: a tenth); the large one has 8N
CROP = 32
# Growth allowed from N to 8N images. Measured on the 2-core VM (2026-12-06): the streamed programs' peak
# RSS grows by 0 to +26 MiB from N to 8N and by no more at 64N (6,400 images: knn_eval +33, the probe +17), the
# allocator and the steps in flight settling, not a cost per image; the old labelled_arrays grows by ~280 MiB.
MARGIN_MIB = 60

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    sample = imagenette_or_skip()
    out = tmp_path_factory.mktemp("eval_memory")
    roots = {n: eval_memory.build_folder(out, n, n // 10, sample) for n in (N, 8 * N)}
    config = tiny_config(dataset="image_folder", data_dir=str(roots[N]), eval_split="val", image_size=CROP,
                         crop_size=CROP, knn_center_crop_fraction=0.875)
    encoder = str(out / "encoder.msgpack")
    formats.write_flax(encoder, config, random_variables(config))
    return out, roots, encoder


def peak_mib(out, name, command) -> float:
    """Peak RSS of the process tree of `command`, in MiB."""
    measured = eval_memory.measure(command, eval_memory.child_env(), 0.05, out / f"{name}.log")
    return measured["peak_rss_mib"]


def growth(out, roots, name, command) -> tuple[float, float]:
    """(peak MiB over N images, over 8N); `command(n, root)` is the command line."""
    small, large = (peak_mib(out, f"{name}_{n}", command(n, roots[n])) for n in (N, 8 * N))
    return small, large


def test_the_old_labelled_arrays_grow_beyond_the_margin(setup):
    """The measurement sees what holding the decoded images costs: the old
    code's `labelled_arrays(size=256)` over 8N images peaks far above N's."""
    out, roots, _ = setup
    small, large = growth(out, roots, "old", lambda n, root: [
        sys.executable, "-m", "benchmarks.eval_memory", "--child", "old_arrays", str(root)])
    assert large - small > 2 * MARGIN_MIB, (small, large)


def test_features_mode_probe_memory_does_not_grow_with_the_dataset(setup):
    out, roots, encoder = setup
    small, large = growth(out, roots, "features", lambda n, root: [
        sys.executable, "-m", "moco_jax.linear_eval", f"--pretrained={encoder}",
        "--config.dataset=image_folder", f"--config.data_dir={root}", "--config.eval_split=val",
        "--config.mode=features", "--config.batch_size=32", "--config.eval_batch_size=32",
        "--config.num_train_steps=10", "--config.log_every_steps=5", f"--workdir={out / f'probe_{n}'}"])
    assert (out / f"probe_{8 * N}" / "features" / "train").is_dir()
    assert large - small < MARGIN_MIB, f"peak RSS {small:.0f} MiB over {N} images, {large:.0f} MiB over {8 * N}"


def test_knn_eval_memory_does_not_grow_with_the_dataset(setup):
    out, roots, encoder = setup
    small, large = growth(out, roots, "knn", lambda n, root: [
        sys.executable, "-m", "moco_jax.knn_eval", f"--pretrained={encoder}", f"--data_dir={root}",
        "--batch_size=32", "--k=20"])
    assert f"bank: {8 * N} images" in (out / f"knn_{8 * N}.log").read_text()
    assert large - small < MARGIN_MIB, f"peak RSS {small:.0f} MiB over {N} images, {large:.0f} MiB over {8 * N}"

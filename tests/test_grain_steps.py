"""The grain training steps at ImageNet scale (moco_jax/data/pipelines/grain.py):
a step decoded in chunks of `IMAGES_PER_ELEMENT` images (so that several
workers share it and shared memory per worker is bounded) is the step an
independent per-image computation gives, resumed or not, over processes;
undecodable images are filled from other chunks of their step; files are
read ahead in threads without changing a pixel; and what grain pickles into
each worker does not grow with the number of files.

Folders of solid-colour images (tests/image_files.py), 8 px crops.
"""
import pickle
import threading
import time

import numpy as np
import pytest
from PIL import Image

from moco_jax.data import SourceConfig, source as source_lib
from moco_jax.data.pipelines import grain, pillow_ops
from moco_jax.data.sources import image_folder
from image_files import _save

S, SCALE, SEED = 8, (0.2, 1.0), 11


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """100 small noise images (every box crops differently) in 4 class
    folders; 97 and 98 undecodable."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(100):
        folder = root / f"class{i % 4}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (14 + i % 5, 20 + i % 7, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    for bad in (97, 98):
        (root / f"class{bad % 4}" / f"{bad:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    return root


def expected_step(files, step, global_batch, process_index, process_count, labels=False):
    """The step computed image by image with `pillow_ops.two_crops`, the crop
    seeds at each image's global stream position (the oracle)."""
    indices = source_lib.step_indices(len(files), global_batch, SEED, step, process_index, process_count)
    first = step * global_batch + process_index * len(indices)
    crops = np.stack([pillow_ops.two_crops(files.read(int(i)), pillow_ops.example_uniforms(SEED, first + j), S,
                                           SCALE) for j, i in enumerate(indices)])
    return (crops, np.asarray([files.files.label(int(i)) for i in indices])) if labels else crops


def good_files(many):
    paths = image_folder.list_image_files(many).paths
    return image_folder.FileImages(paths[[not p.endswith(("097.png", "098.png")) for p in paths]])


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: spawns workers, 6 s
def test_chunked_steps_are_the_per_image_crops_resumed_over_processes(many, workers):
    """global_batch 96 over 2 processes: 48 images a step each, decoded as
    chunks of 32 and 16 (by 2 worker processes, or threads), joined back."""
    files = good_files(many)
    assert grain.IMAGES_PER_ELEMENT == 32
    options = grain.Options(workers=workers, threads=2, read_threads=3)
    for process_index in range(2):
        stream = grain.two_crop_batches(files, global_batch=96, seed=SEED, crop_size=S, crop_scale=SCALE,
                                        start_step=3, process_index=process_index, process_count=2,
                                        num_local_devices=2, options=options)
        for step, batch in zip(range(3, 6), stream):  # steps 3-5: the second epoch starts at step 1
            assert batch.shape == (2, 24, 2, S, S, 3)
            np.testing.assert_array_equal(batch.reshape(48, 2, S, S, 3),
                                          expected_step(files, step, 96, process_index, 2))
        stream.close()


def test_labelled_chunks_keep_each_label_with_its_image(many):
    table = image_folder.list_image_files(many)
    keep = np.asarray([not p.endswith(("097.png", "098.png")) for p in table.paths])
    labelled = image_folder.FileImages(
        image_folder.file_index.FileTable.from_paths(table.paths[keep], table.labels[keep]), labelled=True)
    stream = grain.two_crop_batches(labelled, global_batch=80, seed=SEED, crop_size=S, crop_scale=SCALE,
                                    start_step=1, labels=True)
    crops, labels = next(stream)
    want_crops, want_labels = expected_step(labelled, 1, 80, 0, 1, labels=True)
    np.testing.assert_array_equal(crops[0], want_crops)
    np.testing.assert_array_equal(labels[0], want_labels)
    stream.close()


def test_an_undecodable_image_is_filled_from_its_step_across_chunks(many, caplog):
    """With skip_corrupt, each undecodable image's slot holds the nearest
    decoded image before it in the step (else after), whichever chunk that
    is in; the step stays full and the skips are counted here."""
    files = image_folder.FileImages(np.asarray(image_folder.list_image_files(many).paths))
    bad = {i for i in range(len(files)) if files.files.path(i).endswith(("097.png", "098.png"))}
    options = grain.Options(workers=0, threads=2, skip_corrupt=True)
    stream = grain.two_crop_batches(files, global_batch=96, seed=SEED, crop_size=S, crop_scale=SCALE,
                                    options=options)
    seen = 0
    for step, batch in zip(range(3), stream):
        indices = source_lib.step_indices(len(files), 96, SEED, step)
        batch = batch[0]
        for j, index in enumerate(indices):
            if int(index) in bad:
                seen += 1
                good = [k for k in range(len(indices)) if int(indices[k]) not in bad]
                source = max([k for k in good if k < j], default=min(good))
                np.testing.assert_array_equal(batch[j], batch[source])
    stream.close()
    assert seen >= 2 and any("skipping undecodable" in r.getMessage() for r in caplog.records)


class SlowFiles:
    """FileImages whose reads take 20 ms, counting how many run at once."""

    def __init__(self, files):
        self.files, self.lock, self.active, self.most = files, threading.Lock(), 0, 0

    def __len__(self):
        return len(self.files)

    def read(self, index):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.02)
        with self.lock:
            self.active -= 1
        return self.files.read(index)

    def describe(self, index):
        return self.files.describe(index)


def test_reads_run_ahead_in_threads_and_change_no_pixel(many):
    files = good_files(many)
    slow = SlowFiles(files)
    u = pillow_ops.stream_uniforms(SEED, np.arange(40), 2)
    indices = np.arange(40)
    ahead = grain.random_crops(slow, indices, u, S, SCALE, labelled=False, read_threads=4)
    assert slow.most >= 2, "no file was read while another was being read"
    slow.most = 0
    inline = grain.random_crops(slow, indices, u, S, SCALE, labelled=False, read_threads=0)
    assert slow.most == 1
    for key in ("crops", "labels", "ok"):
        np.testing.assert_array_equal(ahead[key], inline[key])
    assert ahead["ok"].all() and ahead["reasons"] == inline["reasons"] == ()


def _grain_sources(folder):
    """What grain pickles into a worker for each stream of an image folder:
    the pretraining steps, the labelled steps and the evaluation steps over
    all images (no max_images cap)."""
    spec = SourceConfig(dataset="image_folder", data_dir=str(folder), train_split="", eval_split="",
                        input_workers=0, input_threads=1)
    source = image_folder.ImageFolderSource(spec)
    captured = []
    real = grain._elements

    def capture(source_, options, element_bytes, prefetch=2):
        captured.append(len(pickle.dumps(source_)))
        return real(source_, options, element_bytes, prefetch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grain, "_elements", capture)
        for stream in (source.train_batches(global_batch=8, seed=0, crop_size=S),
                       source.labelled_train_batches(global_batch=8, seed=0, crop_size=S, split=""),
                       source.eval_batches(split="", size=S, crop_fraction=1.0, global_batch=8)):
            next(stream)
            stream.close()
    return captured


def test_what_a_worker_receives_does_not_grow_with_the_files(tmp_path):
    """100 vs 5,000 files: the pickled grain sources (file table, subsets)
    are the same size give or take the digits of a count."""
    sizes = []
    for n in (100, 5000):
        root = tmp_path / str(n)
        for c in range(4):
            (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            _save(root / f"c{i % 4}" / f"{i:05d}.png", i % 200, fmt="PNG", size=(10, 10))
        sizes.append(_grain_sources(root))
    assert len(sizes[0]) == 3
    for small, large in zip(*sizes):
        assert abs(large - small) <= 16, sizes
        assert large < 2000, sizes


def test_element_bytes_are_bounded_by_the_chunk():
    steps = grain._Steps(None, global_batch=1024, seed=0, start_step=0, process_index=0, process_count=2,
                         crop_size=224, crop_scale=SCALE)
    assert steps.chunks == 16 and steps.element_bytes == 32 * 2 * 224 * 224 * 3
    small = grain._Steps(None, global_batch=16, seed=0, start_step=0, process_index=0, process_count=1,
                         crop_size=224, crop_scale=SCALE)
    assert small.chunks == 1 and small.element_bytes == 16 * 2 * 224 * 224 * 3

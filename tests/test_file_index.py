"""The image folder's index (moco_jax/data/sources/file_index.py): the same
listing as pathlib's, written once and reused (by later opens, by a new
process, by the job's other processes), refreshed when the folder changes,
rebuilt when unreadable, kept elsewhere when data_dir is read-only, and
pickled into grain workers at a size independent of the number of files.

No jax: processes are threads or subprocesses with injected process indices.
"""
import dataclasses
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.listing import old_list_image_files
from moco_jax.data import SourceConfig
from moco_jax.data.sources import file_index, image_folder
from image_files import _save, make_corrupt_folder, make_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory)


def counting(monkeypatch):
    """Count file_index.list_folder calls (thread-safe enough: list.append)."""
    calls = []
    real = file_index.list_folder
    monkeypatch.setattr(file_index, "list_folder", lambda root: calls.append(str(root)) or real(root))
    return calls


def touch_files(root, counts, empty_class=None):
    """Empty files root/c<k>/<i>.jpg (only names matter to a listing)."""
    for k, n in enumerate(counts):
        (root / f"c{k:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / f"c{k:03d}" / f"{i:07d}.jpg").touch()
    if empty_class:
        (root / empty_class).mkdir()
    return root


def index_files(index_dir):
    return sorted(p for p in os.listdir(index_dir) if p.endswith(file_index.SUFFIX))


def bump(path, seconds=10):
    """Move a folder's mtime forward explicitly (coarse-mtime file systems)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10 ** 9))


# --------------------------------------------------------------------------- listing
def test_same_listing_as_pathlib(folder, tmp_path_factory, tmp_path):
    corrupt = make_corrupt_folder(tmp_path_factory)
    (folder / ".hidden").mkdir(exist_ok=True)
    (folder / ".hidden" / "x.png").touch()
    (folder / "cat" / ".y.png").touch()
    (tmp_path / "empty_class").mkdir()
    _save(tmp_path / "b.png", 0, fmt="PNG")
    (tmp_path / "a").mkdir()
    _save(tmp_path / "a" / "c.JPG", 1, fmt="JPEG")
    for root in (folder, corrupt, tmp_path):
        paths, labels, classes = old_list_image_files(root)  # pathlib, a stat per file
        paths, labels = paths.tolist(), labels.tolist()
        table = file_index.open_table(root, str(tmp_path / "index" / root.name))
        assert table.path_array().tolist() == paths and table.labels.tolist() == labels
        assert table.class_names == classes and table.num_unlabelled == labels.count(-1)
        assert [table.path(i) for i in range(len(table))] == paths
        files = image_folder.list_image_files(root)
        assert files.paths.tolist() == paths and files.class_names == classes
    assert file_index.list_folder(tmp_path).class_names == ("a",)  # a folder without images is no class
    with pytest.raises(FileNotFoundError, match="does not exist"):
        file_index.open_table(tmp_path / "missing", str(tmp_path / "index"))
    with pytest.raises(FileNotFoundError, match="no images"):
        file_index.list_folder(tmp_path / "empty_class")


# --------------------------------------------------------------------------- once, and refreshed
def test_written_once_reused_and_refreshed(tmp_path, monkeypatch):
    root = touch_files(tmp_path / "data", [3, 2])
    index_dir, _ = file_index.index_location(root)  # data_dir itself is the split: root/.moco_jax_index
    assert index_dir == str(root / file_index.INDEX_FOLDER)
    calls = counting(monkeypatch)
    first = file_index.open_table(root, index_dir)
    again = file_index.open_table(root, index_dir)
    assert len(calls) == 1 and again.index_file == first.index_file and len(again) == 5
    assert index_files(index_dir) == [os.path.basename(first.index_file)]
    assert os.stat(first.index_file).st_mode & 0o777 == 0o666 & ~file_index._umask()  # other users' jobs read it

    def changed(change, expect):
        change()
        for sub in [root, *root.iterdir()]:
            if sub.is_dir() and not sub.name.startswith("."):
                bump(sub)
        n = len(calls)
        table = file_index.open_table(root, index_dir)
        assert len(calls) == n + 1, "the change went unseen"
        assert [os.path.relpath(p, root) for p in table.path_array()] == expect
        assert index_files(index_dir) == [os.path.basename(table.index_file)]  # the stale one removed
        return table

    changed(lambda: (root / "c000" / "new.jpg").touch(),
            ["c000/0000000.jpg", "c000/0000001.jpg", "c000/0000002.jpg", "c000/new.jpg", "c001/0000000.jpg",
             "c001/0000001.jpg"])
    changed(lambda: (root / "c000" / "new.jpg").unlink(),
            ["c000/0000000.jpg", "c000/0000001.jpg", "c000/0000002.jpg", "c001/0000000.jpg", "c001/0000001.jpg"])
    changed(lambda: (root / "c001" / "0000001.jpg").rename(root / "c001" / "renamed.png"),
            ["c000/0000000.jpg", "c000/0000001.jpg", "c000/0000002.jpg", "c001/0000000.jpg", "c001/renamed.png"])
    table = changed(lambda: touch_files(root, [0, 0, 1]),
                    ["c000/0000000.jpg", "c000/0000001.jpg", "c000/0000002.jpg", "c001/0000000.jpg",
                     "c001/renamed.png", "c002/0000000.jpg"])
    assert table.class_names == ("c000", "c001", "c002") and table.labels.tolist() == [0, 0, 0, 1, 1, 2]


def test_corrupt_or_old_version_index_rebuilt(tmp_path, monkeypatch):
    root = touch_files(tmp_path / "data", [2, 2])
    index_dir = str(tmp_path / "index")
    path = file_index.open_table(root, index_dir).index_file
    good = Path(path).read_bytes()
    calls = counting(monkeypatch)
    header = json.dumps({"version": file_index.VERSION - 1, "count": 4}).encode()
    for bad in (b"", b"garbage" * 10, good[:len(good) // 2],
                file_index.MAGIC + np.uint64(len(header)).tobytes() + header + good[16 + len(header):]):
        file_index._mapped.cache_clear()  # a new process: nothing mapped yet
        Path(path).write_bytes(bad)
        table = file_index.open_table(root, index_dir)
        assert table.index_file == path and Path(path).read_bytes() == good and len(table) == 4
    assert len(calls) == 4


def test_an_index_deleted_after_it_was_mapped_is_written_again(tmp_path, monkeypatch):
    """This process still maps the deleted file, but worker processes it
    starts later cannot: the next open writes it again."""
    root = touch_files(tmp_path / "data", [2, 2])
    index_dir = str(tmp_path / "index")
    path = file_index.open_table(root, index_dir).index_file
    shutil.rmtree(index_dir)
    calls = counting(monkeypatch)
    table = file_index.open_table(root, index_dir)
    assert len(calls) == 1 and table.index_file == path and os.path.exists(path) and len(table) == 4


# --------------------------------------------------------------------------- across processes
def test_a_new_process_reads_the_index(folder, tmp_path):
    index_dir = str(tmp_path / "index")
    table = file_index.open_table(folder, index_dir)
    code = ("import json, sys\n"
            "from moco_jax.data.sources import file_index\n"
            "def refuse(root): raise AssertionError('listed again')\n"
            "file_index.list_folder = refuse\n"
            f"t = file_index.open_table({str(folder)!r}, {index_dir!r})\n"
            "print(json.dumps([t.index_file, t.path_array().tolist(), t.labels.tolist()]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    index_file, paths, labels = json.loads(out.stdout.strip().splitlines()[-1])
    assert index_file == table.index_file and paths == table.path_array().tolist()
    assert labels == table.labels.tolist()


def test_process_1_waits_for_process_0(tmp_path, monkeypatch):
    root = touch_files(tmp_path / "data", [3, 3])
    index_dir = str(tmp_path / "index")
    calls = counting(monkeypatch)
    slow = file_index.list_folder
    monkeypatch.setattr(file_index, "list_folder", lambda root: time.sleep(0.5) or slow(root))
    tables = {}

    def open_as(p):
        tables[p] = file_index.open_table(root, index_dir, process_index=p, wait=file_index.Wait(poll=0.05))

    waiting = threading.Thread(target=open_as, args=(1,))
    waiting.start()
    time.sleep(0.3)  # process 1 is polling before process 0 starts
    open_as(0)
    waiting.join(10)
    assert len(calls) == 1 and tables[0].index_file == tables[1].index_file
    assert tables[1].path_array().tolist() == tables[0].path_array().tolist()


def test_without_process_0_each_lists_on_its_own(tmp_path, monkeypatch, caplog):
    """No sign of process 0 (its marker) within the grace period: an index
    folder it does not share (per-host copies of the data)."""
    root = touch_files(tmp_path / "data", [2])
    calls = counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        table = file_index.open_table(root, str(tmp_path / "index"), process_index=3,
                                      wait=file_index.Wait(poll=0.05, grace=0.2))
    assert len(calls) == 1 and len(table) == 2
    assert any("process 3: no index of" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- where
def test_read_only_data_dir_falls_back(tmp_path, monkeypatch, caplog):
    root = touch_files(tmp_path / "data" / "train", [2, 2])
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)  # root ignores chmod
    spec = SourceConfig("image_folder", data_dir=str(tmp_path / "data"), eval_split="", input_workers=0)
    source = image_folder.open_source(spec, index_fallback=str(tmp_path / "run" / "data_index"), process_index=0)
    assert Path(source.files.index_file).parent == tmp_path / "run" / "data_index"
    assert not (tmp_path / "data" / file_index.INDEX_FOLDER).exists()
    file_index._private_dir.cache_clear()
    with caplog.at_level(logging.WARNING):
        private = image_folder.open_source(spec, process_index=1)  # private: lists, waits for no one
        image_folder.open_source(spec, process_index=0)
    warnings = [r.getMessage() for r in caplog.records if "--config.index_dir" in r.getMessage()]
    assert len(warnings) == 1 and "private to this process" in warnings[0]
    assert not Path(private.files.index_file).is_relative_to(tmp_path) and len(private.files) == 4
    explicit = image_folder.open_source(dataclasses.replace(spec, index_dir=str(tmp_path / "idx")), process_index=0)
    assert Path(explicit.files.index_file).parent == tmp_path / "idx"
    assert root.is_dir()


# --------------------------------------------------------------------------- what grain workers receive
@pytest.mark.slow  # 10,000 files (tests/test_grain_steps.py checks the grain sources' size on 5,000, quicker)
def test_pickled_size_does_not_grow_with_the_files(tmp_path):
    sizes = []
    for name, counts in (("a", [50, 50]), ("b", [5_000, 5_000])):
        touch_files(tmp_path / name / "train", counts)
        touch_files(tmp_path / name / "val", [1, 1])
        spec = SourceConfig("image_folder", data_dir=str(tmp_path / name), eval_split="val", input_workers=0)
        source = image_folder.open_source(spec, process_index=0)
        assert source.num_train_examples == sum(counts)
        images = image_folder.FileImages(source._labelled("val"), labelled=True)
        assert images.files.label_map == (0, 1) and images.files.label(1) == 1
        sizes.append((len(pickle.dumps(image_folder.FileImages(source.files))), len(pickle.dumps(images))))
    assert sizes[0] == sizes[1] and max(sizes[0]) < 1000, sizes
    restored = pickle.loads(pickle.dumps(images))
    assert restored.describe(1) == images.describe(1) and restored.files.memory is None


def test_a_data_dir_without_write_bits_is_read_only(tmp_path):
    """Made read-only on purpose (a shared dataset): not written into, even by root."""
    (tmp_path / "data").mkdir()
    os.chmod(tmp_path / "data", 0o555)
    try:
        assert file_index.index_location(tmp_path / "data", fallback=str(tmp_path / "w")) == (str(tmp_path / "w"), True)
    finally:
        os.chmod(tmp_path / "data", 0o755)
    assert file_index.index_location(tmp_path / "data") == (str(tmp_path / "data" / file_index.INDEX_FOLDER), True)

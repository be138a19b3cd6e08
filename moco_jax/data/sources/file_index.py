"""An image folder's file list, listed once per job and memory-mapped.

Listing ImageNet's 1.28M training files with pathlib (`is_file()`: a stat
per file) takes about 40 s on a local disk and minutes on NFS, and held as a
numpy unicode array the list takes ~261 MB, copied into every grain worker
process. Here:

  listing     `os.scandir`, the class folders (the root's direct, not hidden
              sub-folders) in parallel threads, no stat per file: a name's
              extension says whether it is an image.
  signature   a hash of the root's and of each class folder's mtime and name
              (`folder_signature`: one stat per class folder). Adding,
              removing or renaming a file changes its folder's mtime, so an
              index whose name holds the signature is either current or
              simply a different file. (Changes within one mtime tick of a
              coarse-mtime file system go unseen; editing a file in place
              changes no name, so no listing.)
  index file  one binary file, written atomically (temp file + os.replace) to
              `<index_dir>/<folder>-<folder key>-<signature>.mjidx`: magic,
              a JSON header (format version, count, class names), then
              int32 labels (N,), int64 offsets (N + 1,) and the utf-8 blob of
              the paths relative to the root. Read through a memory map, its
              pages are shared by every process of the host.
  once a job  process 0 lists and writes; the others wait for the file (process
              0 announces its listing with a marker file: with no marker after
              a grace period the index folder is not shared with process 0,
              e.g. per-host copies of the data, and each lists on its own);
              later launches and the evaluation programs read it.

A `FileTable` is the listing as the pipelines read it, `path(i)` and
`label(i)`; it pickles as the index file's path (plus, for another split,
its small class map), so grain worker processes receive a few hundred bytes
and map the file themselves. No jax here: numpy and the standard library.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from absl import logging

from moco_jax.core.errors import NotFoundError, PathError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
NO_LABEL = -1
INDEX_FOLDER = ".moco_jax_index"  # in data_dir, when no index_dir is set: hidden, so never listed
VERSION = 1  # of the index file format; files of another version are rebuilt
MAGIC = b"MJIDX\x00\x00\x01"
SUFFIX = ".mjidx"
_ALIGN = 64


@dataclasses.dataclass(frozen=True)
class Listing:
    """A folder tree's images, as listed.

    Attributes:
      names: paths relative to the root (N,): root-level images first, then by
        class folder, each sorted by file name.
      labels: int32 (N,), index into class_names, NO_LABEL for root-level images.
      class_names: sorted names of the class folders that hold images.
    """

    names: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_root(root: str) -> tuple[list[str], list[str]]:
    """(sorted image names in root, sorted class folder names)."""
    images, folders = [], []
    with os.scandir(root) as entries:
        for e in entries:
            if _hidden(e.name):
                continue
            if e.is_dir():  # d_type: no stat, except on file systems that lack it
                folders.append(e.name)
            elif _is_image(e.name):
                images.append(e.name)
    return sorted(images), sorted(folders)


def _images_in(folder: str) -> list[str]:
    """Sorted image names in `folder`, by extension alone (no stat)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if _is_image(e.name))


def _threads(n: int) -> int:
    """Threads for n folders: enough to overlap a network file system's round
    trips, few enough that Python's share of the work (the GIL) does not
    queue them on a small machine (1 thread lists a local, cached folder
    fastest: benchmarks/listing.py)."""
    return max(1, min(n, 16, 2 * (os.cpu_count() or 1)))


def list_folder(root) -> Listing:
    """All images in `root` and its direct sub-folders (the classes), the class
    folders scanned in parallel threads (readdir releases the GIL).

    Raises:
      NotFoundError: `root` is not a folder or holds no image.
    """
    root = str(root)
    if not os.path.isdir(root):
        raise NotFoundError(f"image folder {root} does not exist")
    loose, folders = _scan_root(root)
    with concurrent.futures.ThreadPoolExecutor(_threads(len(folders))) as pool:
        per_folder = list(pool.map(_images_in, [os.path.join(root, f) for f in folders]))
    names, labels, classes = list(loose), [NO_LABEL] * len(loose), []
    for folder, files in zip(folders, per_folder):
        if files:
            names += [f"{folder}/{f}" for f in files]
            labels += [len(classes)] * len(files)
            classes.append(folder)
    if not names:
        raise NotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root} or its sub-folders")
    return Listing(names, np.asarray(labels, np.int32), tuple(classes))


def folder_signature(root) -> str:
    """A hash of the root's and each class folder's name and st_mtime_ns: it
    changes when a file is added, removed or renamed in the root or a class
    folder, or a class folder comes or goes (one stat per class folder)."""
    root = str(root)
    _, folders = _scan_root(root)
    with concurrent.futures.ThreadPoolExecutor(_threads(len(folders))) as pool:
        mtimes = list(pool.map(lambda f: os.stat(os.path.join(root, f)).st_mtime_ns, folders))
    h = hashlib.sha256(f"v{VERSION}\0{os.stat(root).st_mtime_ns}".encode())
    for folder, mtime in zip(folders, mtimes):
        h.update(f"\0{folder}\0{mtime}".encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------
# The index file.
# --------------------------------------------------------------------------
def folder_key(root) -> str:
    """The part of an index file's name that says which folder it lists."""
    path = os.path.abspath(str(root))
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(path))[:40] or "root"
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def index_path(index_dir, root, signature: str) -> str:
    return os.path.join(os.path.abspath(str(index_dir)), f"{folder_key(root)}-{signature}{SUFFIX}")


def _pad(n: int, align: int = 8) -> int:
    return -n % align


def _layout(header_bytes: int, count: int) -> tuple[int, int, int]:
    """Byte offsets of the labels, the offsets and the blob."""
    start = 16 + header_bytes
    labels = start + _pad(start, _ALIGN)
    offsets = labels + 4 * count
    offsets += _pad(offsets)
    return labels, offsets, offsets + 8 * (count + 1)


def encode_names(names: Sequence[str]) -> tuple[np.ndarray, bytes]:
    """(int64 (N + 1,) offsets, utf-8 blob) of `names`."""
    encoded = [n.encode("utf-8", "surrogateescape") for n in names]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return offsets, b"".join(encoded)


def write_index(path: str, listing: Listing, signature: str) -> None:
    """The index file of `listing` at `path`, atomically (a reader sees the old
    file, none, or this one whole)."""
    offsets, blob = encode_names(listing.names)
    header = json.dumps({"version": VERSION, "count": len(listing.names), "blob_bytes": len(blob),
                         "class_names": list(listing.class_names), "signature": signature,
                         "unlabelled": int((listing.labels == NO_LABEL).sum())}).encode()
    at_labels, at_offsets, at_blob = _layout(len(header), len(listing.names))
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from other users' jobs
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + np.uint64(len(header)).tobytes() + header)
            f.write(b"\0" * (at_labels - f.tell()))
            f.write(np.ascontiguousarray(listing.labels, np.int32).tobytes())
            f.write(b"\0" * (at_offsets - f.tell()))
            f.write(offsets.tobytes())
            f.write(blob)
            assert f.tell() == at_blob + len(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclasses.dataclass(frozen=True, eq=False)
class _Arrays:
    """A listing as arrays: labels int32 (N,), offsets int64 (N + 1,), the
    utf-8 blob of the names (bytes or an mmap)."""

    labels: np.ndarray
    offsets: np.ndarray
    blob: object
    class_names: tuple[str, ...]
    unlabelled: int

    def name(self, i: int) -> str:
        return self.blob[int(self.offsets[i]):int(self.offsets[i + 1])].decode("utf-8", "surrogateescape")


class StaleIndexError(Exception):
    """An index file that cannot be read as this version writes it."""


def read_index(path: str) -> _Arrays:
    """The arrays of the index file at `path`, memory-mapped.

    Raises:
      FileNotFoundError: no such file.
      StaleIndexError: not an index file of this version, or cut short.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 16:
            raise StaleIndexError(f"{path}: {size} bytes")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if mm[:8] != MAGIC:
            raise StaleIndexError(f"{path}: not a moco_jax index file of version {VERSION}")
        header_bytes = int(np.frombuffer(mm[8:16], np.uint64)[0])
        header = json.loads(mm[16:16 + header_bytes].decode())
        if header.get("version") != VERSION:
            raise StaleIndexError(f"{path}: version {header.get('version')}, not {VERSION}")
        count = int(header["count"])
        at_labels, at_offsets, at_blob = _layout(header_bytes, count)
        if size != at_blob + int(header["blob_bytes"]):
            raise StaleIndexError(f"{path}: {size} bytes, the header says {at_blob + header['blob_bytes']}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        mm.close()
        raise StaleIndexError(f"{path}: unreadable header ({e})") from None
    except StaleIndexError:
        mm.close()
        raise
    labels = np.frombuffer(mm, np.int32, count, at_labels)
    offsets = np.frombuffer(mm, np.int64, count + 1, at_offsets)
    blob = memoryview(mm)[at_blob:]
    return _Arrays(labels, offsets, _Bytes(blob), tuple(header["class_names"]), int(header["unlabelled"]))


class _Bytes:
    """A memoryview that slices to bytes (mmap slices, without copying the map)."""

    def __init__(self, view: memoryview):
        self.view = view

    def __getitem__(self, s: slice) -> bytes:
        return self.view[s].tobytes()


@functools.lru_cache(maxsize=16)
def _mapped(path: str) -> _Arrays:
    """The index file at `path`, mapped once per process (a grain worker maps
    it on its first read)."""
    try:
        return read_index(path)
    except FileNotFoundError:
        raise NotFoundError(f"the image index {path} is gone: the folder changed and a newer run replaced it; "
                            "restart this run") from None


def _in_memory(listing: Listing) -> _Arrays:
    offsets, blob = encode_names(listing.names)
    return _Arrays(np.asarray(listing.labels, np.int32), offsets, blob, tuple(listing.class_names),
                   int((np.asarray(listing.labels) == NO_LABEL).sum()))


# --------------------------------------------------------------------------
# The table the pipelines read.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class FileTable:
    """The image files of one folder tree, random access: `path(i)`,
    `label(i)`. Backed by an index file (pickles as its path: a size
    independent of the number of files) or, when none could be written, by
    arrays in memory (pickled whole).

    Attributes:
      root: the folder; paths are root/<name in the index>.
      index_file: the index file ('' = in memory).
      label_map: int (num classes of this folder,): the label reported for
        each of its class folders (another split's classes mapped to the train
        split's); None: their own index.
      label_names: the classes the labels index (None: this folder's).
      memory: the arrays of an in-memory table.
    """

    root: str
    index_file: str = ""
    label_map: Optional[tuple[int, ...]] = None
    label_names: Optional[tuple[str, ...]] = None
    memory: Optional[_Arrays] = None

    @classmethod
    def from_listing(cls, root, listing: Listing) -> "FileTable":
        return cls(str(root), memory=_in_memory(listing))

    @classmethod
    def from_paths(cls, paths, labels=None) -> "FileTable":
        """In memory, from full paths: str (N,), labels int32 (N,) (None: all NO_LABEL)."""
        names = [str(p) for p in np.asarray(paths).reshape(-1)]
        labels = np.full(len(names), NO_LABEL, np.int32) if labels is None else np.asarray(labels, np.int32)
        classes = tuple(str(c) for c in range(int(labels.max(initial=-1)) + 1))
        return cls("", memory=_in_memory(Listing(names, labels, classes)))

    @property
    def _arrays(self) -> _Arrays:
        return self.memory if self.memory is not None else _mapped(self.index_file)

    def __len__(self) -> int:
        return len(self._arrays.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self._arrays.name(int(i)))

    def label(self, i: int) -> int:
        raw = int(self._arrays.labels[int(i)])
        return raw if self.label_map is None or raw == NO_LABEL else self.label_map[raw]

    @property
    def labels(self) -> np.ndarray:
        """int32 (N,), read-only when not mapped: the memory-mapped array itself."""
        raw = self._arrays.labels
        if self.label_map is None:
            return raw
        table = np.asarray(self.label_map + (NO_LABEL,), np.int32)  # NO_LABEL (-1) -> the last entry
        return table[raw]

    @property
    def folder_classes(self) -> tuple[str, ...]:
        """This folder's own class folders (sorted names)."""
        return self._arrays.class_names

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes the labels index."""
        return self.folder_classes if self.label_names is None else self.label_names

    @property
    def num_unlabelled(self) -> int:
        """Images outside the class folders (label NO_LABEL)."""
        return self._arrays.unlabelled

    def relabelled(self, label_map, label_names) -> "FileTable":
        """This table with its labels mapped: label_map int (len(folder_classes),)."""
        return dataclasses.replace(self, label_map=tuple(int(x) for x in label_map), label_names=tuple(label_names))

    def path_array(self) -> np.ndarray:
        """str (N,): every path, materialized (tf.data takes them as an array;
        ~200 B a path for ImageNet's)."""
        arrays = self._arrays
        return np.asarray([os.path.join(self.root, arrays.name(i)) for i in range(len(arrays.labels))])


# --------------------------------------------------------------------------
# Where the index lives, and once per job.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Wait:
    """How processes other than 0 wait for process 0's index file: every
    `poll` s, a log line every `log_every` s; with no sign of process 0's
    listing (its marker file) after `grace` s, or no file after `timeout` s,
    each lists on its own."""

    poll: float = 0.3
    log_every: float = 30.0
    grace: float = 60.0
    timeout: float = 1800.0


@functools.lru_cache(maxsize=1)
def _private_dir() -> str:
    folder = tempfile.mkdtemp(prefix="moco_jax_index-")
    atexit.register(shutil.rmtree, folder, True)
    logging.warning("the image folder listing is kept in %s, private to this process: every process of every "
                    "launch lists the folder itself; set --config.index_dir to a folder every process can write "
                    "(e.g. on the shared file system) to list it once", folder)
    return folder


def _writable(folder: str) -> bool:
    """os.access, and not made read-only on purpose (no write bit: root may
    write anyway, but a dataset's owner said not to)."""
    try:
        return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)
    except OSError:
        return False


def index_location(data_dir, index_dir: str = "", fallback: str = "") -> tuple[str, bool]:
    """(the folder of the index files, whether it may be shared by the job's
    processes): `index_dir` when set; else data_dir/.moco_jax_index when it
    can be written there; else `fallback` (the trainer's workdir/data_index);
    else a temporary folder private to this process (with a warning, once)."""
    if index_dir:
        return str(index_dir), True
    auto = os.path.join(str(data_dir), INDEX_FOLDER)
    if _writable(auto if os.path.isdir(auto) else str(data_dir)):
        return auto, True
    if fallback:
        return str(fallback), True
    return _private_dir(), False


def _make_dir(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise PathError(f"cannot create the image index folder {folder} ({e.strerror}): set --config.index_dir "
                        "to a writable folder") from None


def _open(path: str, root: str) -> Optional[FileTable]:
    """The table of the index file at `path`, or None when there is none
    readable (missing, cut short, another version). Missing is asked of the
    disk, not of this process's maps: a file deleted since it was mapped
    must be written again (for the worker processes that map it later)."""
    if not os.path.exists(path):
        _mapped.cache_clear()
        return None
    try:
        _mapped(path)
    except (NotFoundError, StaleIndexError):
        return None
    return FileTable(root, path)


def _await(path: str, root: str, marker: str, wait: Wait) -> Optional[FileTable]:
    """Process 0's index file at `path`, once it appears; None when it does not
    (no marker within wait.grace, or none by wait.timeout)."""
    start = last_log = time.monotonic()
    while True:
        table = _open(path, root)
        if table is not None:
            return table
        now = time.monotonic()
        if now - start > wait.timeout or (now - start > wait.grace and not os.path.exists(marker)):
            return None
        if now - last_log >= wait.log_every:
            logging.info("waiting for process 0 to list %s (%.0f s): %s", root, now - start, path)
            last_log = now
        time.sleep(wait.poll)


def _remove_older(index_dir: str, root, keep: str) -> None:
    """Delete the other index files of `root` in `index_dir` (stale listings)."""
    prefix = folder_key(root) + "-"
    for name in os.listdir(index_dir):
        path = os.path.join(index_dir, name)
        if name.startswith(prefix) and name.endswith(SUFFIX) and path != keep:
            try:
                os.unlink(path)
            except OSError:
                pass


def open_table(root, index_dir: str, *, process_index: int = 0, shared: bool = True,
               wait: Wait = Wait()) -> FileTable:
    """The files of `root`, from its current index file in `index_dir`,
    listed (and the index written) when there is none. With `shared`, only
    process 0 lists; the others wait for its file (`Wait`).

    Raises:
      NotFoundError: `root` is not a folder or holds no image.
      PathError: `index_dir` cannot be created.
    """
    root = str(root)
    if not os.path.isdir(root):
        raise NotFoundError(f"image folder {root} does not exist")
    _make_dir(index_dir)  # before the signature: index_dir may lie in root, and creating it changes root's mtime
    signature = folder_signature(root)
    path = index_path(index_dir, root, signature)
    table = _open(path, root)
    if table is not None:
        return table
    marker = path + ".listing"
    if shared and process_index:
        table = _await(path, root, marker, wait)
        if table is not None:
            return table
        logging.warning("process %d: no index of %s from process 0 in %s; listing it here (is %s shared by "
                        "every process? else set --config.index_dir)", process_index, root, path, index_dir)
    start = time.monotonic()
    try:
        Path(marker).touch()
    except OSError:
        pass
    try:
        listing = list_folder(root)
        try:
            write_index(path, listing, signature)
            _remove_older(index_dir, root, keep=path)
        except OSError as e:
            logging.warning("cannot write the image index %s (%s): the file list stays in memory, and the next "
                            "launch lists %s again; set --config.index_dir to a writable folder", path, e, root)
            return FileTable.from_listing(root, listing)
    finally:
        if os.path.exists(marker):
            try:
                os.unlink(marker)
            except OSError:
                pass
    logging.info("listed %s: %d images in %.1f s, index %s", root, len(listing.names), time.monotonic() - start,
                 path)
    return _open(path, root) or FileTable.from_listing(root, listing)

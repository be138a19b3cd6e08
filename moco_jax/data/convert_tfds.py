"""Convert a tensorflow-datasets dataset prepared as TFRecord files to the
ArrayRecord format that grain reads by index (`tfds.data_source`), without
TensorFlow: the records (serialized tf.train.Example protos) are copied as
they are, shard by shard, and the metadata is copied with its file format
changed.

  python -m moco_jax.convert_tfds --dataset_dir=DIR/imagenet2012/5.1.0 --out_data_dir=/data/tfds

writes /data/tfds/imagenet2012/5.1.0/, which `--config.data_dir=/data/tfds`
then reads. The input is left untouched. (tensorflow-datasets' own
`tfds convert_format` does the same but needs Apache Beam.)
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterator

from absl import logging

from moco_jax.core.errors import InputError, NotFoundError

INFO = "dataset_info.json"
TFRECORD, ARRAY_RECORD = "tfrecord", "array_record"


def tfrecords(path: Path) -> Iterator[bytes]:
    """The records of one TFRecord file: each is a little-endian uint64 length,
    its masked CRC (4 bytes), the data, and the data's masked CRC (4 bytes).
    The CRCs are not checked: a damaged record fails when it is decoded."""
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                raise InputError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise InputError(f"{path}: truncated record")
            yield data


def convert(dataset_dir, out_data_dir) -> Path:
    """Write the ArrayRecord copy of `dataset_dir` (.../NAME/VERSION) to
    out_data_dir/NAME/VERSION; returns that directory."""
    from array_record.python import array_record_module  # noqa: PLC0415 - installed with grain

    src = Path(dataset_dir)
    if not (src / INFO).is_file():
        raise NotFoundError(f"{src} is not a prepared tensorflow-datasets dataset (no {INFO}); pass the "
                            "NAME/VERSION directory, e.g. ~/tensorflow_datasets/imagenet2012/5.1.0")
    info = json.loads((src / INFO).read_text())
    fmt = info.get("fileFormat", TFRECORD)
    if fmt != TFRECORD:
        raise InputError(f"{src} is prepared as {fmt}, not {TFRECORD}: nothing to convert")
    dst = Path(out_data_dir) / src.parent.name / src.name
    if dst.resolve() == src.resolve():
        raise InputError("--out_data_dir must differ from the dataset's own data directory")
    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(p for p in src.iterdir() if f".{TFRECORD}-" in p.name)
    if not shards:
        raise NotFoundError(f"no {TFRECORD} files in {src}")
    for p in src.iterdir():
        if p.is_file() and p not in shards and p.name != INFO:
            shutil.copy2(p, dst / p.name)
    for shard in shards:
        out = dst / shard.name.replace(f".{TFRECORD}-", f".{ARRAY_RECORD}-")
        writer = array_record_module.ArrayRecordWriter(str(out), "group_size:1")  # random access, as TFDS writes
        count = 0
        for record in tfrecords(shard):
            writer.write(record)
            count += 1
        writer.close()
        logging.info("%s: %d records", out.name, count)
    info["fileFormat"] = ARRAY_RECORD
    (dst / INFO).write_text(json.dumps(info, indent=2))
    return dst

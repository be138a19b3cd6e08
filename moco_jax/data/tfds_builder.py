"""Finding a prepared tensorflow-datasets dataset, without TensorFlow: its
builder, how it was prepared (ArrayRecord or TFRecord files), and the one
error that says how to prepare it. Both readers (`tfds_source`'s grain path
and `tfds_tf`) start here."""
from __future__ import annotations

import tensorflow_datasets as tfds

from moco_jax.core.errors import ConfigError, NotFoundError
from moco_jax.data.source import has_module

ARRAY_RECORD = "array_record"


class DatasetNotPreparedError(NotFoundError):
    """A tensorflow-datasets dataset with no prepared data in data_dir."""


def dataset_name(dataset: str) -> str:
    """A dataset name without an optional 'tfds:' prefix."""
    return dataset.removeprefix("tfds:")


def default_data_dir_hint() -> str:
    return "TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)"


def not_prepared(builder, name: str, data_dir) -> DatasetNotPreparedError:
    where = data_dir or default_data_dir_hint()
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    how = (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir or 'DIR'}', "
           f"file_format='{ARRAY_RECORD}').download_and_prepare()\"")
    if manual:
        how += (" (this dataset needs a manual download, placed in ~/tensorflow_datasets/downloads/manual: "
                f"{' '.join(manual.split())[:300]})")
    return DatasetNotPreparedError(
        f"tensorflow-datasets dataset {name!r} is not prepared: no data in {builder.data_dir} "
        f"(data_dir searched: {where}). Prepare it once, on a machine that can download it: "
        f"`{how}`, then pass that directory as --config.data_dir; or set "
        "--config.tfds_download=True to let the trainer download and prepare it.")


def prepared_builder(name: str, data_dir=None, download: bool = False):
    """The TFDS builder of `name`, checked to be usable.

    Raises:
      ValueError: `name` is neither one of ours nor a TFDS dataset.
      DatasetNotPreparedError: no prepared data in data_dir (and download is
        False, or downloading failed).
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        from moco_jax.data import SOURCES  # noqa: PLC0415 - the registry imports this module

        raise ConfigError(
            f"dataset={name!r} is not one of {sorted(SOURCES)} and not a "
            "tensorflow-datasets name (see tfds.list_builders())") from None
    if download:
        try:
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001 - any download failure means "not prepared"
            raise not_prepared(builder, name, data_dir) from e
    elif not builder.is_prepared() and not has_module("tensorflow"):
        # With TensorFlow, tf.data says so when it reads (and tfds.testing.
        # mock_data serves unprepared datasets there).
        raise not_prepared(builder, name, data_dir)
    return builder


def file_format(builder) -> str:
    """'array_record', 'tfrecord', ...: how the dataset was prepared."""
    fmt = builder.info.file_format
    return getattr(fmt, "value", fmt) or "tfrecord"

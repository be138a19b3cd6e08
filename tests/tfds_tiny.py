"""A tiny tensorflow-datasets dataset, prepared offline: solid-colour images
(one colour per example, see tests/image_files.py) of varying sizes and
formats, labels 0..2. Preparing it needs TensorFlow; reading it in the
ArrayRecord format does not."""
import numpy as np
import pytest

from image_files import colour

NAME = "tiny_colours"
NUM_TRAIN, NUM_TEST = 20, 6


def prepare(data_dir, file_format: str):
    """Prepare the dataset in data_dir as `file_format` files; returns the
    NAME/VERSION directory."""
    pytest.importorskip("tensorflow", reason="preparing a tensorflow-datasets dataset needs TensorFlow")
    builder = _builder_class()(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare()
    return builder.data_path


_CLASS = []


def _builder_class():
    """Defined on first use (defining it registers the name with tfds)."""
    if _CLASS:
        return _CLASS[0]
    import tensorflow_datasets as tfds

    class TinyColours(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "id": np.int32, "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(NUM_TRAIN)),
                    "test": self._generate_examples(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))}

        def _generate_examples(self, ids):
            for i in ids:
                image = np.broadcast_to(np.asarray(colour(i), np.uint8), (16 + i % 5, 24 - i % 3, 3))
                yield i, {"image": np.ascontiguousarray(image), "id": i, "label": i % 3}

    _CLASS.append(TinyColours)
    return TinyColours

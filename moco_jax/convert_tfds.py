"""Convert a tensorflow-datasets dataset prepared as TFRecord files to
ArrayRecord files, which the grain pipeline reads without TensorFlow (see
`moco_jax.data.convert_tfds`).

  python -m moco_jax.convert_tfds --dataset_dir=~/tensorflow_datasets/imagenet2012/5.1.0 --out_data_dir=/data/tfds
  python train.py --config=configs/moco_v2_imagenet.py --config.data_dir=/data/tfds
"""

from __future__ import annotations

from absl import flags

from moco_jax.data import convert_tfds
from moco_jax.launch import cli


def main(argv):
    del argv  # cli.run refuses extra arguments
    out = convert_tfds.convert(flags.FLAGS.dataset_dir, flags.FLAGS.out_data_dir)
    print(f"wrote {out}; read it with --config.data_dir={out.parent.parent}")


if __name__ == "__main__":
    flags.DEFINE_string("dataset_dir", None, "The prepared dataset: DATA_DIR/NAME/VERSION.", required=True)
    flags.DEFINE_string("out_data_dir", None, "The data directory to write NAME/VERSION into.", required=True)
    cli.run(main)

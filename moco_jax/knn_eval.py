"""Weighted kNN evaluation of a pretrained encoder (the MoCo CIFAR demo's monitor).

  python -m moco_jax.knn_eval --pretrained=/tmp/moco                  # its own dataset
  python -m moco_jax.knn_eval --pretrained=enc.msgpack --dataset=cifar10_arrays --k=200 --temperature=0.1

The feature bank is the un-augmented train split, the queries the test split;
each of the k nearest neighbours (cosine similarity) votes for its label with
weight exp(sim / T). With a projection head, both backbone and projection
features are evaluated, with exactly the code of the in-training monitor
(`moco_jax.eval.embed.knn_accuracies`); without one (a torchvision export)
the backbone.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from absl import flags

from moco_jax import data, pretrained
from moco_jax.core.errors import ConfigError
from moco_jax.eval import knn
from moco_jax.eval.embed import FEATURES
from moco_jax.launch import cli
from moco_jax.training import metrics


def load_dataset(encoder: pretrained.Encoder, name: str = "", data_dir: str = "",
                 image_size: int = 0) -> data.ArrayDataset:
    """The labelled bank/query images: by default those the in-training
    monitor uses (the pretraining config's dataset and kNN fields); `name`
    (with `data_dir`, `image_size`) replaces the pretraining dataset, and
    `data_dir` or `image_size` alone replace those of the pretraining one."""
    config = ml_collections.ConfigDict(encoder.config.to_dict())
    if not name and "dataset" not in config:
        raise ConfigError("the encoder's config names no dataset (imported weights): pass --dataset")
    spec = data.SourceConfig.from_config(config) if "dataset" in config else data.SourceConfig(name)
    if name:
        spec = dataclasses.replace(spec, dataset=name, data_dir=data_dir, image_size=image_size)
    else:
        spec = dataclasses.replace(spec, data_dir=data_dir or spec.data_dir, image_size=image_size or spec.image_size)
    return knn.monitor_dataset(data.open_source(spec), _monitor_fields(config))


def _monitor_fields(config) -> ml_collections.ConfigDict:
    """The kNN fields of a pretraining config; weights trained elsewhere have
    none, and get the monitor's usual bank (all of it) and view."""
    fields = dict(knn_train_split="", knn_max_train_images=0, knn_center_crop_fraction=1.0, seed=0)
    fields.update({k: config[k] for k in fields if k in config})
    return ml_collections.ConfigDict(dict(crop_size=config.crop_size, **fields))


def check_flags(f) -> None:
    """The numeric flags, before the encoder is read."""
    for name, value, ok, allowed in (
        ("k", f.k, f.k >= 1, "an integer >= 1"),
        ("temperature", f.temperature, f.temperature > 0, "a number > 0"),
        ("batch_size", f.batch_size, f.batch_size >= 1, "an integer >= 1"),
        ("image_size", f.image_size, f.image_size >= 0, "an integer >= 0 (0 = the dataset's default)"),
    ):
        if not ok:
            raise ConfigError(f"--{name}={value} must be {allowed}")


def features_to_evaluate(choice: str, encoder: pretrained.Encoder) -> tuple[str, ...]:
    """--features as the kinds of feature `encoder` has."""
    if choice == "both":
        return FEATURES if encoder.has_head else ("backbone",)
    if choice == "projection" and not encoder.has_head:
        raise ConfigError("--features=projection: this encoder has no projection head (e.g. a torchvision "
                          "export); use --features=backbone")
    return (choice,)


def main(argv):
    del argv  # cli.run refuses extra arguments
    metrics.quiet_library_logs()
    f = flags.FLAGS
    check_flags(f)
    encoder = pretrained.load(f.pretrained)
    features = features_to_evaluate(f.features, encoder)
    dataset = load_dataset(encoder, f.dataset, f.data_dir, f.image_size)
    result = encoder.knn_accuracies(dataset, f.k, f.temperature, f.batch_size, features)
    print(f"weighted kNN (k={f.k}, T={f.temperature}) of {f.pretrained} on {dataset.name}:")
    for name, accuracy in result.items():
        print(f"  {name:<10} top-1 {accuracy:.2%}")


if __name__ == "__main__":
    flags.DEFINE_string("pretrained", None, "Pretraining workdir or exported encoder (see moco_jax.pretrained).")
    flags.DEFINE_string("dataset", "", f"One of {sorted(data.SOURCES)} or a tensorflow-datasets name; "
                        "'' = the encoder's pretraining dataset.")
    flags.DEFINE_string("data_dir", "", "Dataset location; '' = its default (or the pretraining one).")
    flags.DEFINE_integer("image_size", 0, "Load in-memory images at this size (digits); 0 = the dataset default.")
    flags.DEFINE_integer("k", 200, "Neighbours.")
    flags.DEFINE_float("temperature", 0.1, "T in the neighbour weight exp(sim / T).")
    flags.DEFINE_integer("batch_size", 256, "Images per embedding batch.")
    flags.DEFINE_enum("features", "both", ["backbone", "projection", "both"], "Which features to evaluate.")
    flags.mark_flags_as_required(["pretrained"])
    cli.run(main)

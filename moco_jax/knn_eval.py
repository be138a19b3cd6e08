"""Weighted kNN evaluation of a pretrained encoder (the MoCo CIFAR demo's monitor).

  python -m moco_jax.knn_eval --pretrained=/tmp/moco                  # its own dataset
  python -m moco_jax.knn_eval --pretrained=enc.msgpack --dataset=cifar10_arrays --k=200 --temperature=0.1

`--pretrained` takes anything `moco_jax.pretrained.load` reads, as in every
other program (a pretraining workdir, a .msgpack or .safetensors export, an
official MoCo .pth.tar). By default the images are those of the encoder's
pretraining config; `--dataset`, `--data_dir` and `--image_size` replace them.
A pretraining config that stored a relative `data_dir` (older versions of
train.py did) names a folder relative to where it was trained: from another
directory pass `--data_dir`.

The feature bank is the un-augmented train split, all of it unless
`--max_train_images` caps it (the pretraining config's `knn_max_train_images`
caps only the in-training monitor's bank; the printout names the bank, and
accuracies over different banks do not compare); the queries are the eval
split. Each of the k nearest neighbours (cosine similarity) votes for its
label with weight exp(sim / T). With a projection head, both backbone and
projection features are evaluated, with exactly the code of the in-training
monitor (`moco_jax.eval.embed.knn_accuracies`); without one (a torchvision
export) the backbone.

Bank and queries are streamed over every device: each device keeps the bank
features it computed (an ImageNet-1k bank never sits on one host or one
device). Several processes (multi-host) run the same command and join like
train.py, under SLURM / Open MPI / Cloud TPU by themselves, elsewhere with

  python -m moco_jax.knn_eval --pretrained=W --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import ml_collections
from absl import flags

from moco_jax import data, pretrained
from moco_jax.core.errors import ConfigError, NotFoundError, UserError
from moco_jax.eval import knn
from moco_jax.eval.embed import FEATURES
from moco_jax.launch import cli, compilation_cache, distributed


def load_dataset(encoder: pretrained.Encoder, name: str = "", data_dir: str = "", image_size: int = 0,
                 max_train_images: int = 0) -> knn.KnnData:
    """The labelled bank and query images, streamed: by default the dataset,
    kNN bank split, view and queries of the in-training monitor (the
    pretraining config's dataset and kNN fields), but the bank all of its
    split unless `max_train_images` caps it (the fixed random subset of
    `knn_subset`); `name` (with `data_dir`, `image_size`) replaces the
    pretraining dataset, and `data_dir` or `image_size` alone replace those
    of the pretraining one."""
    config = ml_collections.ConfigDict(encoder.config.to_dict())
    if not name and "dataset" not in config:
        raise ConfigError("the encoder's config names no dataset (imported weights): pass --dataset")
    spec = data.SourceConfig.from_config(config) if "dataset" in config else data.SourceConfig(name)
    if name:
        spec = dataclasses.replace(spec, dataset=name, data_dir=data_dir, image_size=image_size)
    else:
        if not data_dir:
            check_stored_data_dir(spec.data_dir)
        spec = dataclasses.replace(spec, data_dir=data_dir or spec.data_dir, image_size=image_size or spec.image_size)
    fields = _monitor_fields(config)
    fields.knn_max_train_images = max_train_images
    try:
        return knn.monitor_data(data.open_source(spec), fields)
    except UserError as e:
        raise _with_knn_flags(e) from None


def check_stored_data_dir(data_dir: str) -> None:
    """A relative data_dir stored in a pretraining config is relative to the
    directory the encoder was trained from, which is not known: where it does
    not exist from here, say so (rather than fail on a folder that is not
    there) and ask for --data_dir."""
    if data_dir and not os.path.isabs(data_dir) and not os.path.exists(data_dir):
        raise NotFoundError(
            f"the encoder's pretraining config stores data_dir={data_dir!r}, a path relative to the directory it "
            f"was trained from, and {os.path.abspath(data_dir)} does not exist: pass --data_dir=<the dataset's "
            "absolute path>")


# The dataset fields knn_eval has flags for; the others come from the encoder's config.
_FLAGS = ("dataset", "data_dir", "image_size")


def _with_knn_flags(error: UserError) -> UserError:
    """`error` with the --config.<field> hints of the pretraining program
    (knn_eval has no --config) spelled as knn_eval's flags where it has one,
    else as the pretraining config's field."""
    message = re.sub(r"--config\.(\w+)", lambda m: f"--{m.group(1)}" if m.group(1) in _FLAGS
                     else f"the pretraining config's {m.group(1)}", str(error))
    if message == str(error):
        return error
    try:
        return type(error)(message)
    except TypeError:  # an error class with other constructor arguments: keep it as it is
        return error


def _monitor_fields(config) -> ml_collections.ConfigDict:
    """The kNN fields of a pretraining config; weights trained elsewhere have
    none, and get the monitor's usual bank (all of it) and view."""
    fields = dict(knn_train_split="", knn_max_train_images=0, knn_center_crop_fraction=1.0, seed=0,
                  train_split=data.SourceConfig.train_split, eval_split=data.SourceConfig.eval_split)
    fields.update({k: config[k] for k in fields if k in config})
    return ml_collections.ConfigDict(dict(crop_size=config.crop_size, **fields))


def check_flags(f) -> None:
    """The numeric flags, before the encoder is read."""
    for name, value, ok, allowed in (
        ("k", f.k, f.k >= 1, "an integer >= 1"),
        ("temperature", f.temperature, f.temperature > 0, "a number > 0"),
        ("batch_size", f.batch_size, f.batch_size >= 1, "an integer >= 1"),
        ("image_size", f.image_size, f.image_size >= 0, "an integer >= 0 (0 = the dataset's default)"),
        ("max_train_images", f.max_train_images, f.max_train_images >= 0, "an integer >= 0 (0 = the whole split)"),
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


# The flags every process of a multi-process run must agree on.
_SHARED_FLAGS = ("pretrained", "dataset", "data_dir", "image_size", "max_train_images", "k", "temperature",
                 "batch_size", "features")


def main(argv, join=lambda: False):
    del argv  # cli.run refuses extra arguments
    join()  # first: a multi-process run's processes connect before anything touches a device
    compilation_cache.enable(flags.FLAGS.compilation_cache)  # before anything compiles
    f = flags.FLAGS
    distributed.check_same_config(ml_collections.ConfigDict({name: f[name].value for name in _SHARED_FLAGS}))
    check_flags(f)
    encoder = pretrained.load(f.pretrained)
    features = features_to_evaluate(f.features, encoder)
    dataset = load_dataset(encoder, f.dataset, f.data_dir, f.image_size, f.max_train_images)
    try:
        result = encoder.knn_accuracies(dataset, f.k, f.temperature, f.batch_size, features)
    except UserError as e:  # e.g. an undecodable image, found while streaming
        raise _with_knn_flags(e) from None
    if jax.process_index() == 0:
        print(f"weighted kNN (k={f.k}, T={f.temperature}) of {f.pretrained} on {dataset.name}:")
        print(f"  bank: {result.bank_size} images of {dataset.bank.description}; "
              f"queries: {result.num_queries} images of {dataset.queries.description}")
        for name, accuracy in result.items():
            print(f"  {name:<10} top-1 {accuracy:.2%}")


if __name__ == "__main__":
    flags.DEFINE_string("pretrained", None, pretrained.FLAG_HELP)
    flags.DEFINE_string("dataset", "", f"One of {sorted(data.SOURCES)} or a tensorflow-datasets name; "
                        "'' = the encoder's pretraining dataset.")
    flags.DEFINE_string("data_dir", "", "Dataset location; '' = its default (or the pretraining one, which "
                        "must then exist from the current directory if it is relative).")
    flags.DEFINE_integer("image_size", 0, "Load in-memory images at this size (digits); 0 = the dataset default.")
    flags.DEFINE_integer("k", 200, "Neighbours.")
    flags.DEFINE_float("temperature", 0.1, "T in the neighbour weight exp(sim / T).")
    flags.DEFINE_integer("batch_size", 256, "Images per embedding step, over all devices (rounded up to a multiple "
                         "of them).")
    flags.DEFINE_integer("max_train_images", 0, "Bank: at most this many images of the train split, a fixed random "
                         "subset (0 = all of it).")
    flags.DEFINE_enum("features", "both", ["backbone", "projection", "both"], "Which features to evaluate.")
    compilation_cache.define_flag()
    flags.mark_flags_as_required(["pretrained"])
    cli.run(functools.partial(main, join=distributed.define_process_flags()))

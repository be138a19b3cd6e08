"""Weighted kNN evaluation of a pretrained encoder (the MoCo CIFAR demo's monitor).

  python -m moco_jax.knn_eval --pretrained=/tmp/moco                  # its own dataset
  python -m moco_jax.knn_eval --pretrained=enc.msgpack --dataset=cifar10_arrays --k=200 --temperature=0.1

The feature bank is the un-augmented train split, the queries the test split;
each of the k nearest neighbours (cosine similarity) votes for its label with
weight exp(sim / T). With a projection head, both backbone and projection
features are evaluated, with exactly the code of the in-training monitor
(`trainer.knn_accuracies`); without one (a torchvision export) the backbone.
"""

from __future__ import annotations

import ml_collections
from absl import app, flags

from moco_jax import data, knn, metrics, models, pretrained, trainer

FEATURES = ("backbone", "projection")


def eval_config(encoder: pretrained.Encoder, k: int, temperature: float, batch_size: int) -> ml_collections.ConfigDict:
    """The encoder's config with the kNN settings replaced."""
    config = ml_collections.ConfigDict(encoder.config.to_dict())
    config.knn_k, config.knn_temperature, config.eval_batch_size = k, temperature, batch_size
    return config


def knn_eval(encoder: pretrained.Encoder, dataset: data.ArrayDataset, k: int = 200, temperature: float = 0.1,
             batch_size: int = 256, features: tuple[str, ...] = FEATURES) -> dict[str, float]:
    """Top-1 accuracy in [0, 1] per feature kind ('backbone', 'projection')."""
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"features must be among {FEATURES}, got {sorted(unknown)}")
    if encoder.has_head:
        config = eval_config(encoder, k, temperature, batch_size)
        embed = trainer.make_embed_fn(models.build_encoder(config), config)
        result = trainer.knn_accuracies(embed, encoder.variables, dataset, config)
        return {name: result[name] for name in features}
    if "projection" in features:
        raise ValueError("this encoder has no projection head; use features=('backbone',)")
    bank, queries = encoder.embed(dataset.train_images, batch_size), encoder.embed(dataset.test_images, batch_size)
    accuracy = knn.knn_accuracy(queries, dataset.test_labels, bank, dataset.train_labels, dataset.num_classes,
                                k=k, temperature=temperature)
    return {"backbone": accuracy}


def load_dataset(encoder: pretrained.Encoder, name: str | None = None, data_dir: str | None = None,
                 image_size: int | None = None) -> data.ArrayDataset:
    """The labelled bank/query images: by default those the in-training
    monitor uses (`data.load_knn_arrays` of the pretraining config); `name`
    (with `data_dir`, `image_size`) replaces the pretraining dataset."""
    config = ml_collections.ConfigDict(encoder.config.to_dict())
    if name:
        config.dataset, config.data_dir, config.image_size = name, data_dir or "", image_size or None
    elif "dataset" not in config:
        raise ValueError("the encoder's config names no dataset (imported weights): pass --dataset")
    config.seed = config.get("seed", 0)
    return data.load_knn_arrays(config)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metrics.quiet_library_logs()
    f = flags.FLAGS
    encoder = pretrained.load(f.pretrained)
    dataset = load_dataset(encoder, f.dataset, f.data_dir, f.image_size)
    features = FEATURES if f.features == "both" else (f.features,)
    if f.features == "both" and not encoder.has_head:
        features = ("backbone",)
    result = knn_eval(encoder, dataset, f.k, f.temperature, f.batch_size, features)
    print(f"weighted kNN (k={f.k}, T={f.temperature}) of {f.pretrained} on {dataset.name}:")
    for name, accuracy in result.items():
        print(f"  {name:<10} top-1 {accuracy:.2%}")


if __name__ == "__main__":
    flags.DEFINE_string("pretrained", None, "Pretraining workdir or exported encoder (see moco_jax.pretrained).")
    flags.DEFINE_string("dataset", "", "digits | cifar10_arrays; '' = the encoder's pretraining dataset.")
    flags.DEFINE_string("data_dir", "", "Dataset location; '' = its default.")
    flags.DEFINE_integer("image_size", 0, "With --dataset: load images at this size (digits); 0 = the dataset default.")
    flags.DEFINE_integer("k", 200, "Neighbours.")
    flags.DEFINE_float("temperature", 0.1, "T in the neighbour weight exp(sim / T).")
    flags.DEFINE_integer("batch_size", 256, "Images per embedding batch.")
    flags.DEFINE_enum("features", "both", ["backbone", "projection", "both"], "Which features to evaluate.")
    flags.mark_flags_as_required(["pretrained"])
    app.run(main)

"""Export a pretrained query encoder for downstream use, and read it back.

  python -m moco_jax.export --workdir W --format flax        --output enc.msgpack
  python -m moco_jax.export --workdir W --format torchvision --output enc.safetensors
  python -m moco_jax.export --workdir W --format detectron2  --output enc.pkl

`--workdir` takes anything `moco_jax.pretrained.load` reads: a pretraining
workdir (its newest checkpoint), an exported file, or an official MoCo
PyTorch checkpoint (`.pth.tar`, needs PyTorch), so the same command converts
published weights.

Formats:
* flax: one msgpack file (flax.serialization) holding the experiment config
  (JSON) and the query encoder's variables: backbone params and BN statistics,
  and the projection head unless `--noinclude_head`. `read_flax(path)` (or
  `pretrained.load(path)`) gives them back.
* torchvision: a safetensors file with torchvision ResNet names and layouts
  (see `torch_format`); `torchvision.models.resnet50().load_state_dict(...,
  strict=False)` reports only `fc.weight` / `fc.bias` missing. Written with
  `safetensors.numpy`: no PyTorch needed. The metadata records the
  architecture, the input size and the normalisation mean/std a PyTorch user
  must apply to images in [0, 1].
* detectron2: the pickle the official MoCo `convert-pretrain-to-detectron2.py`
  writes: `{"model": {detectron2 name: numpy array}, "__author__": "MOCO",
  "matching_heuristics": True}`, for `MODEL.WEIGHTS` of an R-50 config.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Mapping

import ml_collections
import numpy as np
from absl import app, flags
from flax import serialization

from moco_jax import torch_format, trainer

FLAX_FORMAT = "moco_jax.encoder/v1"


def normalization(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) over RGB in [0, 1] that the encoder's inputs were normalised with."""
    recipe = trainer.augmentation_recipe(config)
    return tuple(recipe.mean), tuple(recipe.std)


def backbone_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The ResNet's {"params", "batch_stats"} out of `MoCoEncoder` variables."""
    return {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}


def architecture_name(config) -> str:
    """'resnet50' for the torchvision model; otherwise the differences spelled
    out, e.g. 'resnet10-width16-cifar_stem'."""
    name = f"resnet{config.model.depth}"
    if config.model.width != 64:
        name += f"-width{config.model.width}"
    if config.model.stem != "imagenet":
        name += f"-{config.model.stem}_stem"
    return name


# ---------------------------------------------------------------------------
# flax
# ---------------------------------------------------------------------------
def write_flax(path: str, config, variables: Mapping[str, Any], include_head: bool = True) -> None:
    """Config + query-encoder variables -> one msgpack file."""
    params = dict(variables["params"])
    if not include_head:
        params.pop("head", None)
    payload = {
        "format": FLAX_FORMAT,
        "config": config.to_json(),
        "variables": {"params": params, "batch_stats": dict(variables["batch_stats"])},
    }
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(_to_numpy(payload)))


def read_flax(path: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The inverse of `write_flax`: (config, {"params", "batch_stats"})."""
    with open(path, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
    if payload.get("format") != FLAX_FORMAT:
        raise ValueError(f"{path} is not a moco_jax flax export (format {payload.get('format')!r})")
    return ml_collections.ConfigDict(json.loads(payload["config"])), payload["variables"]


def _to_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return tree if isinstance(tree, (str, int, float)) else np.asarray(tree)


# ---------------------------------------------------------------------------
# torchvision (safetensors)
# ---------------------------------------------------------------------------
def torchvision_metadata(config) -> dict[str, str]:
    """safetensors metadata: string -> string."""
    mean, std = normalization(config)
    return {
        "format": "pt",
        "architecture": architecture_name(config),
        "depth": str(config.model.depth),
        "width": str(config.model.width),
        "stem": config.model.stem,
        "stem_note": "imagenet: torchvision's 7x7/2 conv1 + 3x3/2 maxpool; cifar: conv1 = 3x3/1 conv, "
        "maxpool = Identity (the MoCo CIFAR demo)",
        "input_size": str(config.crop_size),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "input_note": "RGB in [0, 1], then (x - mean) / std",
        "running_var": "biased batch variance (moco_jax BN convention), used as is in eval mode",
        "moco_jax_config": config.to_json(),
    }


def write_torchvision(path: str, config, variables: Mapping[str, Any]) -> None:
    from safetensors.numpy import save_file  # noqa: PLC0415 - only this format needs it

    state_dict = torch_format.backbone_to_torchvision(backbone_variables(variables))
    save_file(state_dict, path, metadata=torchvision_metadata(config))


def read_torchvision(path: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """A torchvision safetensors file -> (config, backbone-only variables).

    The config comes from the metadata this module writes; for a file from
    elsewhere the architecture is inferred from the weights (see
    `pretrained.imported_config`)."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    from moco_jax import pretrained  # noqa: PLC0415 - pretrained imports this module

    with safe_open(path, framework="np") as f:
        metadata = f.metadata() or {}
    # A torchvision `fc` is a classifier, not a MoCo projection head: dropped.
    state_dict = {k: v for k, v in load_file(path).items() if not k.startswith("fc.")}
    variables, architecture = torch_format.moco_state_dict_to_encoder(state_dict, prefix="")
    if "moco_jax_config" in metadata:
        config = ml_collections.ConfigDict(json.loads(metadata["moco_jax_config"]))
    else:
        config = pretrained.imported_config(architecture)
    return config, variables


# ---------------------------------------------------------------------------
# detectron2
# ---------------------------------------------------------------------------
def detectron2_checkpoint(config, variables: Mapping[str, Any]) -> dict[str, Any]:
    if config.model.stem != "imagenet":
        raise ValueError("detectron2's ResNet has the 7x7 ImageNet stem; this encoder has the "
                         f"{config.model.stem!r} stem")
    state_dict = torch_format.backbone_to_torchvision(backbone_variables(variables))
    return {"model": torch_format.torchvision_to_detectron2(state_dict), "__author__": "MOCO",
            "matching_heuristics": True}


def write_detectron2(path: str, config, variables: Mapping[str, Any]) -> None:
    checkpoint = detectron2_checkpoint(config, variables)  # may refuse: before the file is opened
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f)


WRITERS = {
    "flax": write_flax,
    "torchvision": write_torchvision,
    "detectron2": write_detectron2,
}


# The file ending each format gets, so that `pretrained.load` recognises it.
SUFFIXES = {"flax": ".msgpack", "torchvision": ".safetensors", "detectron2": ".pkl"}


def export(source: str, fmt: str, output: str, include_head: bool = True) -> str:
    """Read `source` (see `pretrained.load_variables`) and write `output` in
    `fmt`, adding the format's file ending if `output` lacks it. Returns the
    path written."""
    from moco_jax import pretrained  # noqa: PLC0415

    if fmt not in WRITERS:
        raise ValueError(f"format must be one of {sorted(WRITERS)}, got {fmt!r}")
    if not output.endswith(SUFFIXES[fmt]):
        output += SUFFIXES[fmt]
    config, variables = pretrained.load_variables(source)
    if fmt == "flax":
        write_flax(output, config, variables, include_head=include_head)
    else:
        WRITERS[fmt](output, config, variables)
    return output


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        path = export(f.workdir, f.format, f.output, include_head=f.include_head)
    except (ValueError, FileNotFoundError) as e:  # a user error: the message, not a traceback
        raise SystemExit(f"export failed: {e}") from None
    print(f"wrote {f.format} export of {f.workdir} to {path}")


if __name__ == "__main__":
    # Defined here, not at import: other modules import this one and define
    # their own flags (e.g. --workdir).
    flags.DEFINE_string("workdir", None, "Pretraining workdir, exported file or official MoCo .pth.tar.")
    flags.DEFINE_enum("format", "flax", sorted(WRITERS), "Output format.")
    flags.DEFINE_string("output", None, "Output file.")
    flags.DEFINE_bool("include_head", True, "flax format: also export the projection head.")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)

"""The files an encoder lives in, read and written: a flax export, a
torchvision safetensors file, a detectron2 pickle, an official MoCo PyTorch
checkpoint, or a pretraining workdir. Every reader returns (config,
variables), with variables {"params": {"backbone", ["head"]}, "batch_stats":
{"backbone"}} of `models.MoCoEncoder`; `load_variables` picks the reader.

Formats:
* flax: one msgpack file (flax.serialization) holding the experiment config
  (JSON) and the query encoder's variables: backbone params and BN statistics,
  and the projection head unless `include_head=False`.
* torchvision: a safetensors file with torchvision ResNet names and layouts
  (see `torch_format`); `torchvision.models.resnet50().load_state_dict(...,
  strict=False)` reports only `fc.weight` / `fc.bias` missing. Written with
  `safetensors.numpy`: no PyTorch needed. The metadata records the
  architecture, the input size and the normalisation mean/std a PyTorch user
  must apply to images in [0, 1].
* detectron2: the pickle the official MoCo `convert-pretrain-to-detectron2.py`
  writes: `{"model": {detectron2 name: numpy array}, "__author__": "MOCO",
  "matching_heuristics": True}`, for `MODEL.WEIGHTS` of an R-50 config.
* official MoCo checkpoints (`.pth.tar`; reading the file needs PyTorch) and
  in-memory torch-style state dicts of numpy arrays (no PyTorch).

Nothing here imports orbax unless a workdir is read.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Mapping

import ml_collections
import numpy as np
from flax import serialization

from moco_jax.core import augment, models
from moco_jax.io import torch_format

FLAX_FORMAT = "moco_jax.encoder/v1"
TORCH_SUFFIXES = (".pth", ".pt", ".tar")


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
    mean, std = augment.normalization(config)
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

    state_dict = torch_format.backbone_to_torchvision(models.backbone_variables(variables))
    save_file(state_dict, path, metadata=torchvision_metadata(config))


def read_torchvision(path: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """A torchvision safetensors file -> (config, backbone-only variables).

    The config comes from the metadata this module writes; for a file from
    elsewhere the architecture is inferred from the weights (see
    `imported_config`)."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    with safe_open(path, framework="np") as f:
        metadata = f.metadata() or {}
    # A torchvision `fc` is a classifier, not a MoCo projection head: dropped.
    state_dict = {k: v for k, v in load_file(path).items() if not k.startswith("fc.")}
    variables, architecture = torch_format.moco_state_dict_to_encoder(state_dict, prefix="")
    if "moco_jax_config" in metadata:
        config = ml_collections.ConfigDict(json.loads(metadata["moco_jax_config"]))
    else:
        config = imported_config(architecture)
    return config, variables


# ---------------------------------------------------------------------------
# detectron2
# ---------------------------------------------------------------------------
def detectron2_checkpoint(config, variables: Mapping[str, Any]) -> dict[str, Any]:
    if config.model.stem != "imagenet":
        raise ValueError("detectron2's ResNet has the 7x7 ImageNet stem; this encoder has the "
                         f"{config.model.stem!r} stem")
    state_dict = torch_format.backbone_to_torchvision(models.backbone_variables(variables))
    return {"model": torch_format.torchvision_to_detectron2(state_dict), "__author__": "MOCO",
            "matching_heuristics": True}


def write_detectron2(path: str, config, variables: Mapping[str, Any]) -> None:
    checkpoint = detectron2_checkpoint(config, variables)  # may refuse: before the file is opened
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f)


# ---------------------------------------------------------------------------
# Weights trained elsewhere, and the reader for any source.
# ---------------------------------------------------------------------------
def imported_config(architecture: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config fields an encoder needs (model, embedding, preprocessing),
    for weights trained elsewhere. ImageNet stem: 224 px inputs normalised
    with ImageNet mean/std (the MoCo v2 recipe); CIFAR stem: 32 px with the
    CIFAR demo's mean/std."""
    imagenet = architecture["stem"] == "imagenet"
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        depth=architecture["depth"], width=architecture["width"], stem=architecture["stem"],
        head=architecture.get("head") or "none", dtype="float32", sync_bn=False, bn_momentum=0.9,
    ))
    config.embed_dim = architecture.get("embed_dim") or 0
    config.bn_splits = 1
    config.augmentation = "moco_v2" if imagenet else "cifar"
    config.crop_size = config.image_size = 224 if imagenet else 32
    config.crop_scale = (0.2, 1.0) if imagenet else (0.08, 1.0)
    return config


def from_torch_state_dict(state_dict: Mapping[str, Any], prefix: str | None = None):
    """An official MoCo `state_dict` (`module.encoder_q.*`, v1 or v2 head) or a
    torchvision one, as numpy arrays -> (config, variables). No PyTorch needed."""
    variables, architecture = torch_format.moco_state_dict_to_encoder(state_dict, prefix)
    return imported_config(architecture), variables


def read_torch_checkpoint(path: str, prefix: str | None = None):
    """An official MoCo checkpoint file (`{"state_dict": ...}`) or a saved
    state dict -> (config, variables). Needs PyTorch (imported here only)."""
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: pip install torch (the CPU build is enough)") from e
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = {k: v.detach().cpu().numpy() for k, v in state_dict.items() if hasattr(v, "numpy")}
    return from_torch_state_dict(state_dict, prefix)


def load_variables(source) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, variables) from a pretraining workdir (newest checkpoint), a
    flax export (`.msgpack`), a torchvision export (`.safetensors`), an
    official MoCo checkpoint (`.pth.tar`, `.pth`, `.pt`) or an in-memory
    torch-style state dict of numpy arrays."""
    if isinstance(source, Mapping):
        return from_torch_state_dict(source)
    source = os.fspath(source)
    if os.path.isdir(source):
        from moco_jax.io import checkpoint  # noqa: PLC0415 - orbax is heavy; only workdirs need it

        return checkpoint.load_encoder_variables(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"no pretrained encoder at {source}")
    if source.endswith(".msgpack"):
        return read_flax(source)
    if source.endswith(".safetensors"):
        return read_torchvision(source)
    if source.endswith(TORCH_SUFFIXES):
        return read_torch_checkpoint(source)
    raise ValueError(f"don't know how to read {source}: expected a workdir, .msgpack, .safetensors or "
                     f"one of {TORCH_SUFFIXES}")


# ---------------------------------------------------------------------------
# The writers by name, and conversion from any source.
# ---------------------------------------------------------------------------
WRITERS = {
    "flax": write_flax,
    "torchvision": write_torchvision,
    "detectron2": write_detectron2,
}


# The file ending each format gets, so that `pretrained.load` recognises it.
SUFFIXES = {"flax": ".msgpack", "torchvision": ".safetensors", "detectron2": ".pkl"}


def export(source: str, fmt: str, output: str, include_head: bool = True) -> str:
    """Read `source` (see `load_variables`) and write `output` in
    `fmt`, adding the format's file ending if `output` lacks it. Returns the
    path written."""
    if fmt not in WRITERS:
        raise ValueError(f"format must be one of {sorted(WRITERS)}, got {fmt!r}")
    if not output.endswith(SUFFIXES[fmt]):
        output += SUFFIXES[fmt]
    config, variables = load_variables(source)
    if fmt == "flax":
        write_flax(output, config, variables, include_head=include_head)
    else:
        WRITERS[fmt](output, config, variables)
    return output

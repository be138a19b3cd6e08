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

Every export is written whole or not at all (a file next to the output,
renamed over it), with the permissions of a plain `open()`: 0644 under the
usual umask 022, so that colleagues on a shared file system can read it.

Nothing here imports orbax unless a workdir is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
from flax import serialization

from moco_jax.core import augment, models, vit
from moco_jax import methods
from moco_jax.core.config import check_fields
from moco_jax.core.errors import ConfigError, InputError, NotFoundError, UserError
from moco_jax.io import old_configs, storage, torch_format

FLAX_FORMAT = "moco_jax.encoder/v1"
TORCH_SUFFIXES = (".pth", ".pt", ".tar")

# What each readable file must be, for the message when it is not.
EXPECTED = {
    "flax": "a moco_jax flax export (expected a msgpack file written by `python -m moco_jax.export --format flax`)",
    "torchvision": "a torchvision ResNet or timm ViT (expected a safetensors file of torchvision ResNet or moco_jax "
                   "ViT weights, e.g. written by `python -m moco_jax.export --format torchvision`)",
    "torch": "a MoCo PyTorch checkpoint (expected a torch.save file holding a ResNet state_dict, e.g. the "
             "checkpoint_0199.pth.tar of facebookresearch/moco main_moco.py)",
}


class MissingDependencyError(UserError, ImportError):
    """Reading this file needs an optional package that is not installed."""


def unreadable(path: str, fmt: str, error: Exception | str) -> InputError:
    """The error for a file that exists but is not the `fmt` file its name
    says: the file, the format expected, and a short reason."""
    reason = error if isinstance(error, (str, UserError)) else f"{type(error).__name__}: {error}"
    reason = " ".join(str(reason).split())
    return InputError(f"{path} is not {EXPECTED[fmt]}: {reason[:300]}{'...' if len(reason) > 300 else ''}")


# timm's names for the ViTs whose shape (width, depth, patch, input side) it has.
TIMM_VITS = {("small", 16, 224): "vit_small_patch16_224", ("base", 16, 224): "vit_base_patch16_224",
             ("tiny", 16, 224): "vit_tiny_patch16_224"}


def architecture_name(config) -> str:
    """'resnet50' for the torchvision model, 'vit_small_patch16_224' for the
    timm one; otherwise the differences spelled out, e.g.
    'resnet10-width16-cifar_stem' or 'vit_mini-patch4-32'."""
    return TORCH_LAYOUTS[config.model.arch].name(config)


def _vit_name(config) -> str:
    key = (config.model.vit, config.model.patch_size, config.crop_size)
    return TIMM_VITS.get(key, f"vit_{key[0]}-patch{key[1]}-{key[2]}")


def _resnet_name(config) -> str:
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
        params.pop("predictor", None)
    payload = {
        "format": FLAX_FORMAT,
        "config": config.to_json(),
        "variables": {"params": params, "batch_stats": dict(variables.get("batch_stats", {}))},
    }
    storage.write_file(path, serialization.msgpack_serialize(_to_numpy(payload)))


def read_flax(path: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """The inverse of `write_flax`: (config, {"params", "batch_stats"}).
    Raises InputError naming the file if it is anything else."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        payload = serialization.msgpack_restore(raw)
    except Exception as e:  # noqa: BLE001 - msgpack raises many kinds; each means "not this format"
        raise unreadable(path, "flax", e) from None
    if not isinstance(payload, Mapping) or payload.get("format") != FLAX_FORMAT:
        found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        raise unreadable(path, "flax", f"its format is {found!r}, not {FLAX_FORMAT!r}")
    try:
        config = _stored_config(payload["config"])
        variables = payload["variables"]
        _check_encoder_variables(variables, TORCH_LAYOUTS[config.model.arch].collections)
    except (KeyError, TypeError, ValueError) as e:
        raise unreadable(path, "flax", e) from None
    return config, variables


# The config fields that rebuild an encoder and its input view.
ENCODER_FIELDS = ("model.depth", "model.width", "model.stem", "model.dtype", "model.bn_momentum",
                  "crop_size", "augmentation", "method", "model.arch", "model.vit", "model.patch_size",
                  "model.mlp_dim")


def _stored_config(text: str) -> ml_collections.ConfigDict:
    """A file's stored config (JSON), as today's (`old_configs.upgraded`);
    ValueError (a ConfigError) unless it describes an encoder this version
    can build (a file's stored config may have been edited)."""
    config = old_configs.upgraded(ml_collections.ConfigDict(json.loads(text)))
    rules = {**models.FIELDS, **methods.FIELDS, **augment.FIELDS}
    check_fields(config, {name: rules[name] for name in ENCODER_FIELDS})
    return config


def _check_encoder_variables(variables, collections: tuple[str, ...]) -> None:
    """KeyError unless `variables` has the backbone's entry in each of `collections`."""
    if not isinstance(variables, Mapping):
        raise TypeError(f"its variables are a {type(variables).__name__}, not a dict")
    for collection in collections:
        if not isinstance(variables.get(collection), Mapping) or "backbone" not in variables[collection]:
            raise KeyError(f"no {collection}/backbone in its variables")


def _to_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return tree if isinstance(tree, (str, int, float)) else np.asarray(tree)


# ---------------------------------------------------------------------------
# torchvision (safetensors)
# ---------------------------------------------------------------------------
def _input_metadata(config) -> dict[str, str]:
    """The metadata every safetensors export has: its format, architecture,
    the input it expects and the config it was trained with."""
    mean, std = augment.normalization(config)
    return {
        "format": "pt",
        "architecture": architecture_name(config),
        "input_size": str(config.crop_size),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "input_note": "RGB in [0, 1], then (x - mean) / std",
        "moco_jax_config": config.to_json(),
    }


def timm_metadata(config) -> dict[str, str]:
    """safetensors metadata of a ViT export: what to build in timm, and how to feed it."""
    size = vit.VIT_SIZES[config.model.vit]
    kwargs = {"img_size": config.crop_size, "patch_size": config.model.patch_size, "embed_dim": size.width,
              "depth": size.depth, "num_heads": size.num_heads, "mlp_ratio": 4, "qkv_bias": True,
              "num_classes": 0, "global_pool": "token", "class_token": True}
    return {
        **_input_metadata(config),
        "timm_kwargs": json.dumps(kwargs),
        "timm_note": "timm.models.vision_transformer.VisionTransformer(**timm_kwargs) (LayerNorm eps 1e-6) loads "
        "this state dict with strict=True. MoCo v3's ViT-Small has 12 heads where timm's vit_small_patch16_224 "
        "has 6: create_model('vit_small_patch16_224', num_heads=12, num_classes=0). pos_embed is the fixed 2-D "
        "sin-cos embedding; features are the [CLS] token after the final norm (forward_features(x)[:, 0]).",
    }


def torchvision_metadata(config) -> dict[str, str]:
    """safetensors metadata: string -> string."""
    return TORCH_LAYOUTS[config.model.arch].metadata(config)


def _resnet_metadata(config) -> dict[str, str]:
    return {
        **_input_metadata(config),
        "depth": str(config.model.depth),
        "width": str(config.model.width),
        "stem": config.model.stem,
        "stem_note": "imagenet: torchvision's 7x7/2 conv1 + 3x3/2 maxpool; cifar: conv1 = 3x3/1 conv, "
        "maxpool = Identity (the MoCo CIFAR demo)",
        "running_var": "biased batch variance (moco_jax BN convention), used as is in eval mode",
    }


def write_torchvision(path: str, config, variables: Mapping[str, Any]) -> None:
    # safetensors' own save_file writes a temporary file and renames it: mode
    # 0600 whatever the umask. Its bytes go through write_file instead.
    from safetensors.numpy import save  # noqa: PLC0415 - only this format needs it

    state_dict = TORCH_LAYOUTS[config.model.arch].state_dict(config, variables)
    storage.write_file(path, save(state_dict, metadata=torchvision_metadata(config)))


def _timm_state_dict(config, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return torch_format.vit_to_timm(variables["params"]["backbone"], config.crop_size // config.model.patch_size)


def _torchvision_state_dict(config, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    del config
    return torch_format.backbone_to_torchvision(models.backbone_variables(variables))


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """How one backbone (`config.model.arch`) goes to PyTorch: its model's
    name, the safetensors metadata, the state dict, the variable collections
    its weights have, and why detectron2 cannot take it ('' if it can)."""

    name: Callable[[Any], str]
    metadata: Callable[[Any], dict[str, str]]
    state_dict: Callable[[Any, Mapping[str, Any]], dict[str, np.ndarray]]
    collections: tuple[str, ...]
    no_detectron2: str = ""


TORCH_LAYOUTS = {
    "resnet": TorchLayout(_resnet_name, _resnet_metadata, _torchvision_state_dict, ("params", "batch_stats")),
    "vit": TorchLayout(_vit_name, timm_metadata, _timm_state_dict, ("params",),
                       "detectron2 export is for ResNets; this encoder is a ViT: export it as --format=torchvision "
                       "(timm layout) or flax"),
}


def read_torchvision(path: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """A torchvision safetensors file -> (config, backbone-only variables).

    The config comes from the metadata this module writes; for a file from
    elsewhere the architecture is inferred from the weights (see
    `imported_config`)."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError and friends: not this format
        raise unreadable(path, "torchvision", e) from None
    if "cls_token" in tensors:
        return _read_timm(path, metadata, tensors)
    # A torchvision `fc` is a classifier, not a MoCo projection head: dropped.
    state_dict = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    try:
        variables, architecture = torch_format.moco_state_dict_to_encoder(state_dict, prefix="")
        if "moco_jax_config" in metadata:
            config = _stored_config(metadata["moco_jax_config"])
        else:
            config = imported_config(architecture)
    except (KeyError, TypeError, ValueError) as e:
        raise unreadable(path, "torchvision", e) from None
    return config, variables


def _read_timm(path: str, metadata: Mapping[str, str], tensors: Mapping[str, np.ndarray]):
    """A ViT export of this library -> (config, {"params": {"backbone"}, "batch_stats": {}}).
    The config (head count, patch size, ...) must come from the metadata:
    the weights do not say how many heads they were trained with."""
    if "moco_jax_config" not in metadata:
        raise unreadable(path, "torchvision", "it is a ViT without moco_jax metadata; its number of attention heads "
                         "is not in the weights, so only ViTs exported by moco_jax are read")
    try:
        config = _stored_config(metadata["moco_jax_config"])
        backbone = torch_format.timm_to_vit({k: v for k, v in tensors.items() if not k.startswith("head.")})
    except (KeyError, TypeError, ValueError) as e:
        raise unreadable(path, "torchvision", e) from None
    return config, {"params": {"backbone": backbone}, "batch_stats": {}}


# ---------------------------------------------------------------------------
# detectron2
# ---------------------------------------------------------------------------
def detectron2_checkpoint(config, variables: Mapping[str, Any]) -> dict[str, Any]:
    refusal = TORCH_LAYOUTS[config.model.arch].no_detectron2
    if refusal:
        raise ConfigError(refusal)
    if config.model.stem != "imagenet":
        raise ConfigError("detectron2's ResNet has the 7x7 ImageNet stem; this encoder has the "
                          f"{config.model.stem!r} stem: export it as --format=flax or torchvision")
    state_dict = torch_format.backbone_to_torchvision(models.backbone_variables(variables))
    return {"model": torch_format.torchvision_to_detectron2(state_dict), "__author__": "MOCO",
            "matching_heuristics": True}


def write_detectron2(path: str, config, variables: Mapping[str, Any]) -> None:
    checkpoint = detectron2_checkpoint(config, variables)  # may refuse: before the file is opened
    storage.write_file(path, pickle.dumps(checkpoint))


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
    return old_configs.upgraded(config)  # a MoCo v1/v2 ResNet, as the official code trains


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
        raise MissingDependencyError(
            f"reading {path} needs PyTorch, which is not installed: pip install torch (the CPU build is enough), "
            "or convert the file where PyTorch is") from e
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: noise next to the result or error
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds; each means "not this format"
        raise unreadable(path, "torch", _torch_load_reason(e)) from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise unreadable(path, "torch", f"it holds a {type(checkpoint).__name__}, not a state_dict")
    state_dict = {k: v.detach().cpu().numpy() for k, v in state_dict.items() if hasattr(v, "numpy")}
    try:
        return from_torch_state_dict(state_dict, prefix)
    except (KeyError, TypeError, ValueError) as e:
        raise unreadable(path, "torch", e) from None


def _torch_load_reason(error: Exception) -> str:
    """torch.load's error in a few words: its weights_only refusal is a page
    of advice around the one line that says what was found."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(error), re.S)
    if found:
        return f"it cannot be unpickled as tensors and containers (torch.load weights_only): {found.group(1)}"
    return f"{type(error).__name__}: {error}"


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
        raise NotFoundError(f"no pretrained encoder at {source}: no such file or directory (expected a pretraining "
                            "workdir, a .msgpack or .safetensors export, or a MoCo .pth.tar checkpoint)")
    if source.endswith(".msgpack"):
        return read_flax(source)
    if source.endswith(".safetensors"):
        return read_torchvision(source)
    if source.endswith(TORCH_SUFFIXES):
        return read_torch_checkpoint(source)
    if source.endswith(SUFFIXES["detectron2"]):
        raise InputError(f"don't know how to read {source}: detectron2 .pkl exports are written for detectron2, "
                         "not read back; pass the workdir or .msgpack it was exported from")
    raise InputError(f"don't know how to read {source}: expected a pretraining workdir, a .msgpack (flax) or "
                     f".safetensors (torchvision) export, or a PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)})")


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


def output_path(output: str, fmt: str) -> str:
    """`output` with the file ending of format `fmt` added if it lacks it."""
    if fmt not in WRITERS:
        raise ConfigError(f"format={fmt!r} must be one of {', '.join(map(repr, WRITERS))}")
    return output if output.endswith(SUFFIXES[fmt]) else output + SUFFIXES[fmt]


def export(source: str, fmt: str, output: str, include_head: bool = True) -> str:
    """Read `source` (see `load_variables`) and write `output` in
    `fmt`, adding the format's file ending if `output` lacks it. Returns the
    path written."""
    output = output_path(output, fmt)
    config, variables = load_variables(source)
    if fmt == "flax":
        write_flax(output, config, variables, include_head=include_head)
    else:
        WRITERS[fmt](output, config, variables)
    return output

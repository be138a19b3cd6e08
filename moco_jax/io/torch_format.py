"""Name and layout mapping between moco_jax variables and PyTorch state dicts.

Pure numpy: nothing here imports PyTorch. Four PyTorch layouts are covered:

* torchvision ResNet (`conv1.weight`, `layer1.0.downsample.1.running_var`,
  ...): the backbone. Our module names already follow torchvision, so the
  mapping is mechanical: `layer1_0` -> `layer1.0`, `downsample_conv` ->
  `downsample.0`, `downsample_bn` -> `downsample.1`; conv kernels HWIO ->
  OIHW; BN `scale`/`bias`/`mean`/`var` -> `weight`/`bias`/`running_mean`/
  `running_var` (+ `num_batches_tracked`).
* official MoCo checkpoints (facebookresearch/moco `main_moco.py`): the same
  backbone names under `module.encoder_q.`, and the projection head as `fc`
  (v1, one Linear) or `fc.0` / `fc.2` (v2, Linear-ReLU-Linear).
* detectron2 (the official `detection/convert-pretrain-to-detectron2.py`):
  `stem.`, `res2`..`res5`, `convN.norm`, `shortcut`, `shortcut.norm`.
* timm's VisionTransformer (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`,
  `norm.weight`, `cls_token`, `pos_embed`): the MoCo v3 ViT backbone.

BatchNorm variance: our BN tracks the *biased* batch variance (Flax's
convention), PyTorch tracks the unbiased one; the two differ by a factor
n / (n - 1), n = the number of values per channel in a BN group (batch x
height x width), which is below 1e-3 for every layer of a real run. Both
frameworks normalise with the stored value in inference mode, so the stored
value is copied unchanged in both directions: an exported model computes
exactly the features of the JAX model, and an imported one exactly those of
the PyTorch model. (Rescaling it would make the two disagree for no gain.)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from moco_jax.core import models, vit
from moco_jax.core.errors import InputError

# The prefix of the query encoder in an official MoCo `state_dict`.
MOCO_PREFIX = "module.encoder_q."

_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_HEAD_TO_TORCH = {"fc": "fc", "fc1": "fc.0", "fc2": "fc.2"}


# ---------------------------------------------------------------------------
# Module names.
# ---------------------------------------------------------------------------
def _torch_module(flax_path: tuple[str, ...]) -> str:
    """('layer1_0', 'downsample_bn') -> 'layer1.0.downsample.1'."""
    parts = []
    for name in flax_path:
        name = re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", name)
        name = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(name, name)
        parts.append(name)
    return ".".join(parts)


def _flax_module(torch_module: str) -> tuple[str, ...]:
    """'layer1.0.downsample.1' -> ('layer1_0', 'downsample_bn'); inverse of `_torch_module`."""
    name = re.sub(r"(layer\d+)\.(\d+)", r"\1_\2", torch_module)
    name = name.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
    return tuple(name.split("."))


# ---------------------------------------------------------------------------
# Backbone <-> torchvision.
# ---------------------------------------------------------------------------
def backbone_to_torchvision(backbone_variables: Mapping[str, Any],
                            num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """ResNet variables -> a torchvision ResNet state dict without `fc.*`.

    Args:
      backbone_variables: {"params": ..., "batch_stats": ...} of `models.ResNet`
        (the `backbone` subtrees of a `MoCoEncoder`'s variables).
      num_batches_tracked: written into every BN's `num_batches_tracked`
        (PyTorch uses it only when BN momentum is None).
    Returns:
      {torchvision name: float32 array in PyTorch layout}; `num_batches_tracked`
      entries are int64 scalars.
    """
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(dict(backbone_variables["params"])).items():
        module, leaf, value = _torch_module(path[:-1]), path[-1], np.asarray(value, np.float32)
        if leaf == "kernel":  # conv: HWIO -> OIHW
            out[f"{module}.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        elif leaf in ("scale", "bias"):  # BN affine
            out[f"{module}.{'weight' if leaf == 'scale' else 'bias'}"] = value
        else:
            raise InputError(f"unexpected backbone parameter {'/'.join(path)}")
    for path, value in traverse_util.flatten_dict(dict(backbone_variables["batch_stats"])).items():
        module = _torch_module(path[:-1])
        out[f"{module}.{_BN_STATS[path[-1]]}"] = np.asarray(value, np.float32)
        out[f"{module}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return out


def torchvision_to_backbone(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A torchvision ResNet state dict (any `fc.*` is ignored) -> {"params",
    "batch_stats"} of `models.ResNet`, float32 numpy. Inverse of
    `backbone_to_torchvision`."""
    params: dict[tuple[str, ...], np.ndarray] = {}
    stats: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        if module == "fc" or module.startswith("fc.") or leaf == "num_batches_tracked":
            continue
        path, value = _flax_module(module), np.asarray(value)
        if leaf == "weight" and value.ndim == 4:  # conv: OIHW -> HWIO
            params[path + ("kernel",)] = np.ascontiguousarray(value.transpose(2, 3, 1, 0), np.float32)
        elif leaf == "weight" and value.ndim == 1:
            params[path + ("scale",)] = value.astype(np.float32)
        elif leaf == "bias" and value.ndim == 1:
            params[path + ("bias",)] = value.astype(np.float32)
        elif leaf in ("running_mean", "running_var"):
            stats[path + ({"running_mean": "mean", "running_var": "var"}[leaf],)] = value.astype(np.float32)
        else:
            raise InputError(f"unexpected torchvision key {key!r} with shape {value.shape}")
    return {"params": traverse_util.unflatten_dict(params), "batch_stats": traverse_util.unflatten_dict(stats)}


# ---------------------------------------------------------------------------
# Official MoCo checkpoints: projection head `fc`, prefixes, architecture.
# ---------------------------------------------------------------------------
def torch_to_head(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str, int] | None:
    """The `fc*` entries of a MoCo state dict -> (head params, kind
    'linear' | 'mlp', embed_dim), or None when there is no head."""
    if "fc.0.weight" in state_dict:
        names, kind = ("fc1", "fc2"), "mlp"
    elif "fc.weight" in state_dict:
        names, kind = ("fc",), "linear"
    else:
        return None
    params = {}
    for name in names:
        torch_name = _HEAD_TO_TORCH[name]
        params[name] = {
            "kernel": np.ascontiguousarray(np.asarray(state_dict[f"{torch_name}.weight"], np.float32).T),
            "bias": np.asarray(state_dict[f"{torch_name}.bias"], np.float32),
        }
    return params, kind, int(params[names[-1]]["kernel"].shape[1])


def strip_prefix(state_dict: Mapping[str, Any], prefix: str | None = None) -> dict[str, Any]:
    """The entries of the query encoder, without their prefix.

    prefix None: `module.encoder_q.` if any key has it (an official MoCo
    checkpoint; `encoder_k`, `queue` and `queue_ptr` are dropped), else
    `encoder_q.`, else `module.` (a DistributedDataParallel model, e.g. the
    output of `main_lincls.py`, whose `fc` is then read as a linear head),
    else the keys as they are (a plain torchvision state dict).
    """
    if prefix is None:
        candidates = (MOCO_PREFIX, "encoder_q.", "module.")
        prefix = next((p for p in candidates if any(k.startswith(p + "conv1.") for k in state_dict)), "")
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def infer_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """depth, width and stem of the torchvision-style ResNet a state dict holds.

    width = output channels of `conv1`; stem 'imagenet' for a 7x7 `conv1`,
    'cifar' for a 3x3 one (then, as in the MoCo CIFAR demo, there is no
    max-pool); depth from the blocks per stage and the block type.
    """
    kernel = np.shape(state_dict["conv1.weight"])
    stem = {7: "imagenet", 3: "cifar"}.get(kernel[-1])
    if stem is None:
        raise InputError(f"conv1.weight has shape {kernel}; expected a 7x7 (imagenet) or 3x3 (cifar) stem")
    blocks = {tuple(m.groups()) for k in state_dict if (m := re.match(r"layer(\d)\.(\d+)\.", k))}
    stages = tuple(sum(1 for s, _ in blocks if s == str(i)) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    for depth, (layout, block) in models.ARCHITECTURES.items():
        if tuple(layout) == stages and (block is models.Bottleneck) == bottleneck:
            return {"depth": depth, "width": int(kernel[0]), "stem": stem}
    raise InputError(f"no ResNet in models.ARCHITECTURES has {stages} blocks per stage (bottleneck={bottleneck})")


def moco_state_dict_to_encoder(state_dict: Mapping[str, Any], prefix: str | None = None):
    """An official MoCo (or plain torchvision) state dict -> moco_jax variables.

    Args:
      state_dict: name -> array (numpy, or anything `np.asarray` accepts).
      prefix: see `strip_prefix`.
    Returns:
      (variables, architecture): variables {"params": {"backbone", ["head"]},
      "batch_stats": {"backbone"}}, float32 numpy; architecture the
      `infer_architecture` dict plus `head` ('linear' | 'mlp' | None) and
      `embed_dim` (None without a head).
    """
    entries = strip_prefix(state_dict, prefix)
    if "conv1.weight" not in entries:
        raise InputError(f"no ResNet found: no 'conv1.weight' under prefix {prefix!r}; "
                         f"keys start {sorted(state_dict)[:5]}")
    architecture = infer_architecture(entries)
    backbone = torchvision_to_backbone(entries)
    variables = {"params": {"backbone": backbone["params"]}, "batch_stats": {"backbone": backbone["batch_stats"]}}
    head = torch_to_head(entries)
    architecture.update(head=None, embed_dim=None)
    if head is not None:
        variables["params"]["head"], architecture["head"], architecture["embed_dim"] = head
    return variables, architecture


# ---------------------------------------------------------------------------
# detectron2.
# ---------------------------------------------------------------------------
def torchvision_to_detectron2(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision names -> the names `convert-pretrain-to-detectron2.py`
    writes (e.g. `layer1.0.downsample.1.running_var` ->
    `res2.0.shortcut.norm.running_var`, `bn1.weight` -> `stem.conv1.norm.weight`).
    The renaming rules are the script's, applied in its order."""
    out = {}
    for k, v in state_dict.items():
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = v
    return out


# ---------------------------------------------------------------------------
# ViT <-> timm.
# ---------------------------------------------------------------------------
def _timm_name(flax_path: tuple[str, ...]) -> str:
    """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight';
    ('patch_embed', 'kernel') -> 'patch_embed.proj.weight'; LayerNorm 'scale' -> 'weight'."""
    *modules, leaf = flax_path
    modules = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", m) for m in modules]
    if modules == ["patch_embed"]:
        modules.append("proj")
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(modules + [leaf])


def vit_to_timm(backbone_params: Mapping[str, Any], grid: int) -> dict[str, np.ndarray]:
    """ViT backbone params (moco_jax/core/vit.py) -> the state dict of a timm
    `VisionTransformer(num_classes=0)`: patch conv HWIO -> OIHW, linear
    kernels (in, out) -> weights (out, in), and `pos_embed`, which is fixed
    here and a (frozen) tensor in timm, written out from `grid` patches per side."""
    state = {}
    for path, value in traverse_util.flatten_dict(dict(backbone_params)).items():
        value = np.asarray(value, np.float32)
        if path == ("patch_embed", "kernel"):
            value = value.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel":
            value = value.T
        state[_timm_name(path)] = np.ascontiguousarray(value)
    width = state["cls_token"].shape[-1]
    state["pos_embed"] = vit.sincos_position_embedding(grid, width)
    return state


def timm_to_vit(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `vit_to_timm`. `pos_embed` must be the fixed sin-cos
    embedding this ViT adds (else the weights are of another model, whose
    features this one would not reproduce)."""
    state = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    pos = state.pop("pos_embed")
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if not np.allclose(pos, vit.sincos_position_embedding(grid, pos.shape[-1]), atol=1e-5):
        raise ValueError("its pos_embed is not MoCo v3's fixed 2-D sin-cos embedding (a learned one cannot be "
                         "loaded into this ViT)")
    flat = {}
    for name, value in state.items():
        parts = name.replace("patch_embed.proj.", "patch_embed.").split(".")
        parts = [f"blocks_{parts[1]}"] + parts[2:] if parts[0] == "blocks" else parts
        leaf = parts[-1]
        if leaf == "weight":
            if parts[-2].startswith("norm"):
                leaf = "scale"
            else:
                leaf = "kernel"
                value = value.transpose(2, 3, 1, 0) if parts[0] == "patch_embed" else value.T
        flat[tuple(parts[:-1] + [leaf])] = np.ascontiguousarray(value)
    return traverse_util.unflatten_dict(flat)

"""Helpers every program shares for its ml_collections config: durations in
epochs or steps, fields by their command-line names, and the start-up checks
of a pretraining config (one clear error, not a shape error deep inside a
compiled step).

Durations. A recipe says "every 10 epochs" or "every 500 steps"; which one it
means matters when the batch size changes. So an interval `X` is two fields,
`X_steps` and `X_epochs` (0 = unset), and `steps(config, "X", spe)` is the
one place that turns it into optimizer steps, as big_vision's `steps()` does.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import numbers
import os
from typing import Any, Callable, Mapping, Sequence

from flax import traverse_util

from moco_jax.core import augment, moco, models, vit
from moco_jax.core.errors import ConfigError
from moco_jax.core.models import ARCHITECTURES


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """A duration in epochs as optimizer steps (rounded)."""
    return int(round(epochs * steps_per_epoch))


def steps(config, name: str, steps_per_epoch: int) -> int:
    """`config.<name>_steps` or `config.<name>_epochs` as steps; 0 if neither is set.

    Both fields must be declared; setting both (> 0) is an error, since the
    two would disagree as soon as the batch size changes. A positive number
    of epochs is at least one step.
    """
    n_steps, n_epochs = config[f"{name}_steps"], config[f"{name}_epochs"]
    if n_steps > 0 and n_epochs > 0:
        raise ConfigError(
            f"{name}_steps={n_steps} and {name}_epochs={n_epochs} are both set; set one of them (the other to 0)"
        )
    if n_steps > 0:
        return int(n_steps)
    if n_epochs > 0:
        return max(1, epochs_to_steps(n_epochs, steps_per_epoch))
    return 0


def is_due(step: int, interval: int, last: int) -> bool:
    """Whether a periodic action (log, checkpoint, evaluation) runs after
    `step`: every `interval` steps (0 = never) and after the last one."""
    return step == last or (interval > 0 and step % interval == 0)


def total_steps(config, steps_per_epoch: int) -> int:
    """The length of a run: `config.num_train_steps` when positive, else
    `num_epochs` of data."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return epochs_to_steps(config.num_epochs, steps_per_epoch)


def flatten_dotted(tree: dict) -> dict[str, Any]:
    """{"model": {"depth": 50}} -> {"model.depth": 50}: config fields by their
    command-line names."""
    return traverse_util.flatten_dict(tree, sep=".")


def no_such_field(name: str, fields: Sequence[str], where: str) -> str:
    """The message for a field name a config lacks, with the closest names it has."""
    close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    close = close or [f for f in fields if name.rsplit(".", 1)[-1] in f][:3]
    hint = f"did you mean {' or '.join(close)}?" if close else f"its fields are listed in {where}"
    return f"the config has no field {name!r}; {hint}"


AUTO_BN_GROUPS = 8  # bn_splits=0: shuffle BN over 8 groups in all, as the MoCo papers' 8 GPUs


def bn_splits_for(config, num_devices: int) -> int:
    """BN groups per device: `config.bn_splits`, or with bn_splits=0 (auto)
    the most splits, up to AUTO_BN_GROUPS / num_devices, that divide the
    per-device batch into groups of 2 or more images (1 from 8 devices on)."""
    if config.bn_splits != 0:
        return int(config.bn_splits)
    if models.method_of(config) == "moco_v3":
        return 1  # no shuffle BN to emulate: plain (or Sync) BN
    per_device = config.batch_size // max(1, num_devices)
    for splits in range(max(1, AUTO_BN_GROUPS // num_devices), 1, -1):
        if per_device % splits == 0 and per_device // splits >= 2:
            return splits
    return 1


PATH_FIELDS = ("data_dir",)


def with_absolute_paths(config):
    """A copy of `config` with its relative local paths (`data_dir`) made
    absolute, so that the config saved with each checkpoint and export means
    the same files from any directory. URLs (gs://...) are kept."""
    config = config.copy_and_resolve_references()
    for name in PATH_FIELDS:
        value = config.get(name, "")
        if value and "://" not in value and not os.path.isabs(value):
            config[name] = os.path.abspath(os.path.expanduser(value))
    return config


def shuffle_bn_warning(config, num_devices: int) -> str:
    """Why this config's shuffle BN is weaker than the papers' (8 BN groups),
    naming the fix; '' when it is not. One group in all shuffles nothing (the
    key encoder's BN sees the query's batch: the cheat shuffle BN prevents);
    auto bn_splits may find fewer than 8 groups when the batch does not divide."""
    if models.method_of(config) == "moco_v3" or not config.shuffle_bn:
        return ""
    groups = num_devices * bn_splits_for(config, num_devices)
    per_device = config.batch_size // max(1, num_devices)
    if groups == 1:
        return (f"shuffle BN over a single BN group (1 device, bn_splits={config.bn_splits}) shuffles nothing: the "
                "key encoder's BN statistics mix all images, the leak shuffle BN exists to prevent; set "
                f"--config.bn_splits=0 (auto: {AUTO_BN_GROUPS} groups in all) or a divisor of {per_device} > 1")
    if config.bn_splits == 0 and groups < AUTO_BN_GROUPS and num_devices < AUTO_BN_GROUPS:
        return (f"bn_splits=0 (auto) found {groups} BN groups, not {AUTO_BN_GROUPS}: the {per_device} images per "
                f"device do not split into {AUTO_BN_GROUPS // num_devices} groups of 2 or more; a batch_size that "
                f"divides by {AUTO_BN_GROUPS} gives {AUTO_BN_GROUPS}")
    return ""


def resolve_for_devices(config, num_devices: int):
    """A copy of `config` with its automatic fields (bn_splits=0) set for
    `num_devices` devices; the config the run is built, validated and saved with."""
    resolved = config.copy_and_resolve_references()
    resolved.bn_splits = bn_splits_for(config, num_devices)
    return resolved


# ---------------------------------------------------------------------------
# Start-up checks: one rule per field a user sets, then the relations
# between fields. A bad value stops the run before any data or model work,
# with one message naming the field, its value and what it may be.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """What one field may hold: `ok(value)`, and `allowed`, the phrase the
    error message completes "<field>=<value> must be ..." with."""

    allowed: str
    ok: Callable[[Any], bool]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value))


def integer(at_least: int | None = None, note: str = "") -> Rule:
    """An int (not a bool), optionally >= at_least."""
    allowed = "an integer" + (f" >= {at_least}" if at_least is not None else "") + note
    return Rule(allowed, lambda v: _is_int(v) and (at_least is None or v >= at_least))


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite int or float in the interval low..high, each end open or closed."""
    if high is None:
        allowed = f"a number {'>' if low_open else '>='} {low}"
    else:
        allowed = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def ok(v) -> bool:
        if not _is_number(v) or v < low or (low_open and v == low):
            return False
        return high is None or v < high or (v == high and not high_open)

    return Rule(allowed, ok)


def one_of(choices) -> Rule:
    """One of `choices`, of the same type too (True is not 1, 50.0 not 50)."""
    choices = tuple(choices)
    return Rule("one of " + ", ".join(map(repr, choices)),
                lambda v: any(v == c and type(v) is type(c) for c in choices))


BOOL = Rule("True or False", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))
NAME = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v))
SCALE = Rule("a pair (low, high) with 0 < low <= high <= 1",
             lambda v: _is_pair(v) and 0 < v[0] <= v[1] <= 1)
EPOCHS = Rule("a list of epochs, each a number >= 0",
              lambda v: isinstance(v, (tuple, list)) and all(_is_number(e) and e >= 0 for e in v))
POSITIVE = number(0, low_open=True)
FRACTION = number(0, 1, low_open=True)  # (0, 1]
MOMENTUM = number(0, 1, high_open=True)  # [0, 1)

# The names some fields take, for the modules that read them (which import
# this one, so the lists live here).
LR_SCHEDULES = ("cosine", "step")  # moco_jax.core.optim
WEIGHT_DECAY_MASKS = ("all", "no_bn_bias")  # moco_jax.core.optim
OPTIMIZERS = ("sgd", "lars", "adamw")  # moco_jax.core.optim
CONV_GRAD_SCALES = ("none", "pytorch_init")  # moco_jax.core.optim
LINEAR_MODES = ("full", "features")  # moco_jax.eval.linear
# In-memory datasets (moco_jax.data.arrays): the side of their images with
# image_size=0, and the one side a dataset may come at (None: any, upsampled).
ARRAY_IMAGE_SIZES = {"digits": (16, None), "cifar10_arrays": (32, 32)}


def interval_rules(*names: str) -> dict[str, Rule]:
    """`X_steps` (an int) and `X_epochs` (a number), both >= 0, per interval X."""
    return {k: v for n in names for k, v in ((f"{n}_steps", integer(0)), (f"{n}_epochs", number(0)))}


# The data and optimizer fields that pretraining and the linear probe share.
_SHARED_RULES = {
    # Data (configs/default.py add_data_fields).
    "dataset": NAME, "data_dir": STRING, "image_size": integer(0), "train_split": STRING,
    "eval_split": STRING, "skip_corrupt_images": BOOL, "input_threads": integer(0),
    "shuffle_buffer": integer(1), "tfds_download": BOOL, "image_key": NAME, "label_key": NAME,
    "data_loader": one_of(("auto", "grain", "tf")),
    "input_workers": integer(-1, note=" (-1: automatic, 0: no worker processes)"),
    # Optimisation.
    "batch_size": integer(1), "num_epochs": number(0),
    "num_train_steps": integer(note=" (> 0: the run's length in steps; else num_epochs decides)"),
    "learning_rate": POSITIVE, "lr_schedule": one_of(LR_SCHEDULES), "lr_drop_epochs": EPOCHS,
    "warmup_epochs": number(0), "weight_decay": number(0),
    "weight_decay_mask": one_of(WEIGHT_DECAY_MASKS), "sgd_momentum": MOMENTUM,
    "seed": integer(0), "eval_batch_size": integer(1),
}

# Every field of a pretraining config (configs/default.py) and what it may hold.
PRETRAINING_RULES = {
    **_SHARED_RULES,
    "knn_train_split": STRING, "train_subset": integer(0), "knn_max_train_images": integer(0),
    "knn_center_crop_fraction": FRACTION, "augmentation": one_of(augment.RECIPE_NAMES),
    "method": one_of(models.METHODS), "optimizer": one_of(OPTIMIZERS), "lars_trust_coefficient": POSITIVE,
    "conv_grad_scale": one_of(CONV_GRAD_SCALES),
    "momentum_schedule": one_of(moco.MOMENTUM_SCHEDULES),
    "model.arch": one_of(models.ARCHS), "model.vit": one_of(vit.VIT_SIZES), "model.patch_size": integer(1),
    "model.stop_grad_patch": BOOL, "model.mlp_dim": integer(1), "model.zero_init_residual": BOOL,
    "model.conv_init": one_of(models.CONV_INITS),
    "crop_size": integer(1), "crop_scale": SCALE,
    "model.depth": one_of(ARCHITECTURES), "model.width": integer(1), "model.stem": one_of(models.STEMS),
    "model.head": one_of(models.HEADS), "model.dtype": one_of(models.DTYPES), "model.sync_bn": BOOL,
    "model.bn_momentum": MOMENTUM, "embed_dim": integer(1), "bn_splits": integer(0, " (0 = auto)"),
    "queue_size": integer(0, " (0: no queue, MoCo v3)"), "temperature": POSITIVE, "momentum": number(0, 1),
    "shuffle_bn": BOOL, "shuffle_mode": one_of(moco.SHUFFLE_MODES), "symmetric_loss": BOOL,
    **interval_rules("log_every", "checkpoint_every", "knn_every"),
    "checkpoints_to_keep": integer(1), "knn_k": integer(1), "knn_temperature": POSITIVE,
    "wandb_project": STRING, "wandb_entity": STRING, "wandb_name": STRING,
}

# Every field of a linear-probe config (configs/linear_cifar10.py).
LINEAR_RULES = {
    **_SHARED_RULES,
    "pretrained": STRING, "mode": one_of(LINEAR_MODES), "max_train_images": integer(0),
    "crop_size": integer(0, " (0 = the encoder's input size)"), "train_crop_scale": SCALE,
    "eval_crop_fraction": FRACTION, **interval_rules("log_every", "checkpoint_every"),
}


def check_fields(config, rules: Mapping[str, Rule]) -> None:
    """Raise one ConfigError listing every field of `config` that breaks its
    rule ("model.width=0 must be an integer >= 1; ..."). Fields the config
    lacks are left to the code that reads them (and its defaults)."""
    values = flatten_dotted(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    problems = [f"{name}={values[name]!r} must be {rule.allowed}"
                for name, rule in rules.items() if name in values and not rule.ok(values[name])]
    if problems:
        raise ConfigError("; ".join(problems))


def check_length(config, intervals: tuple[str, ...]) -> None:
    """A run of at least one step, and each interval given in steps or in epochs, not both."""
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError(
            f"num_train_steps={config.num_train_steps} and num_epochs={config.num_epochs} give no training step: "
            "set num_epochs > 0, or num_train_steps > 0")
    for interval in intervals:
        if f"{interval}_steps" in config and f"{interval}_epochs" in config:
            steps(config, interval, 1)  # refuses an interval given in both steps and epochs


def check_image_sizes(config) -> None:
    """The crop must fit in the images an in-memory dataset is loaded at
    (digits are upsampled to image_size, 16 by default; cifar10_arrays is
    32x32). Files (image folders, tensorflow-datasets) are cropped at their
    own size, so any crop_size fits them."""
    if config.dataset not in ARRAY_IMAGE_SIZES:
        return
    default, fixed = ARRAY_IMAGE_SIZES[config.dataset]
    if fixed and config.image_size not in (0, fixed):
        raise ConfigError(f"image_size={config.image_size} must be 0 or {fixed}: {config.dataset} is {fixed}x{fixed}")
    size = config.image_size or default
    if config.crop_size > size:
        how = f"or image_size >= {config.crop_size} (the images are upsampled to it)" if not fixed else ""
        raise ConfigError(
            f"crop_size={config.crop_size} is larger than the {size}x{size} {config.dataset} images "
            f"(image_size={config.image_size}): set crop_size <= {size} {how}".strip())


def wandb_missing(project: str) -> ConfigError:
    """The error for a W&B project set where the wandb package is missing."""
    return ConfigError(f"wandb_project={project!r} needs the wandb package: `pip install wandb` "
                       "(or --config.wandb_project='')")


def check_wandb(config) -> None:
    """wandb must be importable where config.wandb_project is set: checked on
    every process before the data and model are built, not when the first
    metrics are written (find_spec does not import it)."""
    project = config.get("wandb_project", "")
    if project and importlib.util.find_spec("wandb") is None:
        raise wandb_missing(project)


def validate_config(config, num_devices: int) -> None:
    """Raise ConfigError naming the offending field(s) of a pretraining config.

    Args:
      config: the experiment ConfigDict.
      num_devices: devices on the pmap axis (all processes together).
    """
    check_fields(config, PRETRAINING_RULES)  # types and ranges first: the relations below rely on them
    check_length(config, ("log_every", "checkpoint_every", "knn_every"))
    check_wandb(config)
    check_image_sizes(config)
    batch, queue, splits = config.batch_size, config.queue_size, bn_splits_for(config, num_devices)
    if batch % num_devices:
        raise ConfigError(f"batch_size={batch} must be a positive multiple of the device count ({num_devices})")
    check_method(config)
    if models.method_of(config) == "moco_v2" and (queue <= 0 or queue % batch):
        raise ConfigError(
            f"queue_size={queue} must be a positive multiple of batch_size={batch}: the queue is "
            "overwritten one whole global batch at a time"
        )
    per_device = batch // num_devices
    if splits <= 0 or per_device % splits:
        raise ConfigError(
            f"bn_splits={splits} must be 0 (auto) or a positive number that divides the per-device batch "
            f"(batch_size={batch} / {num_devices} devices = {per_device})"
        )
    moco.check_shuffle_mode(config.shuffle_mode, per_device if config.shuffle_bn else None, num_devices)
    if per_device // splits < 2:
        raise ConfigError(
            f"bn_splits={splits} leaves {per_device // splits} image per BN group (batch_size={batch} / "
            f"{num_devices} devices / {splits} splits); BN needs at least 2: lower bn_splits "
            "(on n devices, bn_splits=1 already gives shuffle BN over n groups)"
        )
    if config.symmetric_loss and queue % (2 * batch):
        raise ConfigError(
            f"queue_size={queue} must be a multiple of 2 * batch_size={2 * batch} with symmetric_loss: "
            "both views' keys enter the queue every step"
        )


def check_method(config) -> None:
    """The fields MoCo v3 has no use for must say so (a v2 habit carried over
    would silently mean nothing), and a ViT must tile its crops."""
    if models.method_of(config) == "moco_v3":
        if config.queue_size:
            raise ConfigError(f"queue_size={config.queue_size} must be 0 with method='moco_v3': MoCo v3 has no "
                              "queue (the negatives are the other keys of the global batch)")
        if config.shuffle_bn:
            raise ConfigError("shuffle_bn=True has no meaning with method='moco_v3' (it uses SyncBN): set "
                              "shuffle_bn=False")
    if models.is_vit(config) and config.model.get("conv_init", "torchvision") != "torchvision":
        raise ConfigError(f"model.conv_init={config.model.conv_init!r} applies to ResNet convolutions only: the "
                          "ViT's patch projection keeps MoCo v3's xavier init (leave model.conv_init='torchvision')")
    if config.get("conv_grad_scale", "none") != "none" and (models.is_vit(config) or config.optimizer != "sgd"):
        raise ConfigError(f"conv_grad_scale={config.conv_grad_scale!r} needs a ResNet trained with optimizer='sgd' "
                          "(it stands in for a smaller init only where every kernel is followed by BN and the "
                          "step is linear in the gradient)")
    if models.is_vit(config) and config.crop_size % config.model.patch_size:
        raise ConfigError(f"crop_size={config.crop_size} must be a multiple of model.patch_size="
                          f"{config.model.patch_size}: the ViT cuts the crop into whole patches")


# Fields that only one kind of encoder or one method reads. Set for another,
# they would do nothing: an override of one is refused (`check_overrides`).
_RESNET = (lambda c: not models.is_vit(c), "a ResNet encoder", "model.arch='vit' is sized by model.vit "
           f"({' | '.join(vit.VIT_SIZES)}) and model.patch_size")
_VIT = (models.is_vit, "a ViT encoder (model.arch='vit')", "a ResNet is sized by model.depth and model.width")
_V2 = (lambda c: models.method_of(c) != "moco_v3", "MoCo v1/v2 (method='moco_v2')",
       "MoCo v3 has no queue and no shuffle BN, is always symmetric, and has its own projector and predictor")
_V3 = (lambda c: models.method_of(c) == "moco_v3", "MoCo v3 (method='moco_v3')",
       "MoCo v1/v2 heads are sized by model.head and embed_dim")
APPLIES_ONLY_TO = {
    **dict.fromkeys(("model.depth", "model.width", "model.stem", "model.zero_init_residual", "model.conv_init"),
                    _RESNET),
    **dict.fromkeys(("model.vit", "model.patch_size", "model.stop_grad_patch"), _VIT),
    **dict.fromkeys(("shuffle_mode", "symmetric_loss", "model.head"), _V2),  # (queue_size, shuffle_bn: check_method)
    "model.mlp_dim": _V3,
}


def check_overrides(config, overridden: Sequence[str]) -> None:
    """Refuse, in one line, a field set on the command line that `config`'s
    encoder or method does not read (e.g. model.width on a ViT)."""
    problems = []
    for name in overridden:
        if name in APPLIES_ONLY_TO:
            applies, kind, instead = APPLIES_ONLY_TO[name]
            if not applies(config):
                problems.append(f"--config.{name} applies only to {kind} and would be ignored here ({instead})")
    if problems:
        raise ConfigError("; ".join(problems))


def validate_linear_config(config, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the offending field(s) of a linear-probe
    config (configs/linear_cifar10.py); `num_devices`, if given, the devices
    full mode splits each batch over."""
    check_fields(config, LINEAR_RULES)
    check_length(config, ("log_every", "checkpoint_every"))
    if num_devices and config.mode == "full" and config.batch_size % num_devices:
        raise ConfigError(f"batch_size={config.batch_size} must be a multiple of the device count ({num_devices}) "
                          "in mode='full' (or use mode='features', on one device)")

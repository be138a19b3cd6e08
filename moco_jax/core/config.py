"""Helpers every program shares for its ml_collections config: durations in
epochs or steps, fields by their command-line names, and the vocabulary of
the start-up checks (`Rule`s, `check_fields`, the error wording).

Each module that reads config fields declares them with their rules next to
its code (`FIELDS` in models.py, optim.py, augment.py, each method, each
data source, the evaluators, the trainer) and checks their relations
itself; a program's checks are the union of its modules' (the trainer's:
`moco_jax/training/checks.py`). This module imports none of them.

Durations. A recipe says "every 10 epochs" or "every 500 steps"; which one it
means matters when the batch size changes. So an interval `X` is two fields,
`X_steps` and `X_epochs` (0 = unset), and `steps(config, "X", spe)` is the
one place that turns it into optimizer steps, as big_vision's `steps()` does.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from typing import Any, Callable, Mapping, Sequence

from moco_jax.core.errors import ConfigError


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


def flatten_dotted(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 50}} -> {"model.depth": 50}: config fields by their
    command-line names (empty sub-dicts dropped, as flax's flatten_dict does;
    written here so that the data pipeline's worker processes, which import
    this module, need neither flax nor jax)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def no_such_field(name: str, fields: Sequence[str], where: str) -> str:
    """The message for a field name a config lacks, with the closest names it has."""
    close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    close = close or [f for f in fields if name.rsplit(".", 1)[-1] in f][:3]
    hint = f"did you mean {' or '.join(close)}?" if close else f"its fields are listed in {where}"
    return f"the config has no field {name!r}; {hint}"


PATH_FIELDS = ("data_dir",)


def with_absolute_paths(config):
    """A copy of `config` with its relative local paths (`data_dir`) made
    absolute, so that the config saved with each checkpoint and export means
    the same files from any directory. URLs (gs://...) are kept."""
    config = config.copy_and_resolve_references()
    for name in PATH_FIELDS:
        value = config[name]
        if value and "://" not in value and not os.path.isabs(value):
            config[name] = os.path.abspath(os.path.expanduser(value))
    return config


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

# The fields of every program's run (`total_steps`, `check_length`, the device split).
RUN_FIELDS = {
    "batch_size": integer(1), "num_epochs": number(0),
    "num_train_steps": integer(note=" (> 0: the run's length in steps; else num_epochs decides)"),
    "seed": integer(0), "eval_batch_size": integer(1),
}


def interval_rules(*names: str) -> dict[str, Rule]:
    """`X_steps` (an int) and `X_epochs` (a number), both >= 0, per interval X."""
    return {k: v for n in names for k, v in ((f"{n}_steps", integer(0)), (f"{n}_epochs", number(0)))}


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


def check_batch_divides(config, num_devices: int) -> None:
    """The global batch splits evenly over the devices."""
    if config.batch_size % num_devices:
        raise ConfigError(f"batch_size={config.batch_size} must be a positive multiple of the device count "
                          f"({num_devices})")

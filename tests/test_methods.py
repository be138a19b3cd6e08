"""The method interface: every registered method provides what the rest of
moco_jax asks of it, and a new method is one module plus one registry line
(nothing else in the library asks which method it runs)."""

import types

import jax
import numpy as np
import pytest

from moco_jax import methods
from moco_jax.core import optim, sharding
from moco_jax.core import state as state_lib
from moco_jax.core.config import flatten_dotted
from moco_jax.core.errors import ConfigError
from moco_jax.methods import base, moco_v2, moco_v3
from moco_jax.training import checks, trainer
from tiny import tiny_config


@pytest.mark.parametrize("module", list(methods.REGISTRY.values()), ids=list(methods.REGISTRY))
def test_every_registered_method_implements_the_interface(module):
    assert isinstance(module, base.Method)
    assert methods.REGISTRY[module.NAME] is module
    # The fields a method owns are in every config (configs/default.py declares them all).
    assert set(module.FIELDS) <= set(flatten_dotted(tiny_config().to_dict())), module.FIELDS


def test_an_unknown_method_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match=r"method='moco_v9' must be one of 'moco_v2', 'moco_v3'"):
        checks.validate_config(tiny_config(method="moco_v9"), 8)
    with pytest.raises(ConfigError, match=r"method='moco_v9' must be one of"):
        methods.get(tiny_config(method="moco_v9"))


def _copy_of(module, name):
    """A new method module: `module`'s code under another name, as a new file would be."""
    copy = types.ModuleType(f"moco_jax.methods.{name}")
    copy.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    copy.NAME, copy.TITLE = name, f"{module.TITLE} (a copy)"
    return copy


@pytest.mark.parametrize("original", [moco_v2, moco_v3], ids=["moco_v2", "moco_v3"])
def test_a_new_method_is_one_module_and_one_registry_line(monkeypatch, original):
    """Register a method under a new name: the config checks, the encoder,
    the state, the pmap-ed step and the start-up line work with it, and its
    step equals the original's."""
    monkeypatch.setitem(methods.REGISTRY, "moco_new", _copy_of(original, "moco_new"))
    overrides = dict(method="moco_v3", queue_size=0, shuffle_bn=False, momentum_schedule="cosine") \
        if original is moco_v3 else {}
    reference, config = tiny_config(**overrides), tiny_config(**{**overrides, "method": "moco_new"})
    results = []
    for cfg in (reference, config):
        checks.validate_config(cfg, 8)
        cfg = checks.resolve_for_devices(cfg, 8)
        tx, _ = optim.make_optimizer(cfg, 10)
        state = state_lib.create_train_state(jax.random.key(0), methods.build_encoder(cfg, sharding.AXIS), tx,
                                             (8, 8, 3), methods.get(cfg).queue_size(cfg), cfg.embed_dim)
        line = trainer.startup_line(cfg, state, 100, 10, 40, 8)
        images = np.random.default_rng(0).integers(0, 256, (8, 2, 8, 8, 3), dtype=np.uint8)
        p_state, metrics = trainer.make_train_step(cfg, total_steps=40)(state_lib.to_devices(state),
                                                                        sharding.shard(images))
        results.append((line, float(np.asarray(metrics["loss"])[0])))
    assert results[1][0] == results[0][0].replace(original.TITLE, f"{original.TITLE} (a copy)")
    assert results[1][1] == results[0][1]


def test_a_field_of_one_method_set_for_another_is_refused():
    with pytest.raises(ConfigError, match=r"--config.model.mlp_dim applies only to MoCo v3 \(method='moco_v3'\)"):
        checks.check_overrides(tiny_config(), ["model.mlp_dim"])
    v3 = tiny_config(method="moco_v3", queue_size=0, shuffle_bn=False)
    with pytest.raises(ConfigError, match=r"--config.shuffle_mode applies only to MoCo v1/v2"):
        checks.check_overrides(v3, ["shuffle_mode"])

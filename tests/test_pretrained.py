"""Loading pretrained encoders: workdirs, exports, official MoCo state dicts."""

import atexit
import functools
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moco_jax import pretrained
from moco_jax.core import models, optim
from moco_jax.core import state as state_lib
from moco_jax.data.sources import arrays
from moco_jax.eval import embed
from moco_jax.io import formats, torch_format
from moco_jax.training import trainer
from moco_jax import methods
from tiny import tiny_config


@functools.lru_cache(maxsize=None)
def tiny_pretraining():
    """One short MoCo run with a workdir, shared by the evaluation and export
    tests (it dominates their run time): ResNet-10 of width 4 on 8x8 digits,
    100 steps of 64 at twice the default learning rate, crops off (so that
    few steps visibly learn: kNN backbone accuracy 43% -> 70%).

    Returns (config, workdir, result of `trainer.train_and_evaluate`).
    """
    workdir = tempfile.mkdtemp(prefix="moco_jax_pretrain_")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    config = tiny_config(num_train_steps=100, log_every_steps=50, learning_rate=0.12, batch_size=64, queue_size=256,
                         crop_scale=(1.0, 1.0), temperature=0.2, embed_dim=32)
    result = trainer.train_and_evaluate(config, workdir=workdir, show_progress=False)
    return config, workdir, result


def initial_variables(config):
    """The encoder a pretraining run with `config` starts from."""
    encoder = methods.build_encoder(config)
    tx, _ = optim.make_optimizer(config, 1)
    image_shape = (config.crop_size, config.crop_size, 3)
    state = state_lib.create_train_state(jax.random.key(config.seed), encoder, tx, image_shape,
                                         config.queue_size, config.embed_dim)
    return jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})


def random_variables(config, seed=0):
    """Random encoder variables for `config`, every leaf non-trivial (BN
    statistics are not 0 / 1). Drawn with numpy from the shapes alone: no
    ResNet is run, which keeps the tests fast."""
    encoder = methods.build_encoder(config)
    image = jnp.zeros((1, config.crop_size, config.crop_size, 3))
    shapes = jax.eval_shape(lambda: encoder.init(jax.random.key(0), image, train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":  # He-scaled, so activations keep a sane size through the net
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def encoder_to_moco_state_dict(variables, prefix=torch_format.MOCO_PREFIX):
    """`MoCoEncoder` variables -> the query-encoder entries of an official MoCo
    `state_dict` (backbone + `fc` head, keys `prefix + name`), written here
    independently of the importer: Dense kernels (in, out) -> Linear weights
    (out, in); v1 head `fc`, v2 head `fc.0` / `fc.2`."""
    flat = torch_format.backbone_to_torchvision(models.backbone_variables(variables))
    for name, dense in variables["params"]["head"].items():
        torch_name = {"fc": "fc", "fc1": "fc.0", "fc2": "fc.2"}[name]
        flat[f"{torch_name}.weight"] = np.ascontiguousarray(np.asarray(dense["kernel"], np.float32).T)
        flat[f"{torch_name}.bias"] = np.asarray(dense["bias"], np.float32)
    return {prefix + k: v for k, v in flat.items()}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_load_workdir_gives_the_trained_query_encoder():
    _, workdir, result = tiny_pretraining()
    encoder = pretrained.load(workdir)
    state = result["state"]
    assert_trees_equal(encoder.variables, jax.tree.map(np.asarray, {"params": state.params,
                                                                    "batch_stats": state.batch_stats}))


def test_embed_is_the_trainers_embedding(tmp_path):
    config = tiny_config()
    variables = random_variables(config)
    path = str(tmp_path / "encoder.msgpack")
    formats.write_flax(path, config, variables)

    encoder = pretrained.load(path)                      # the three lines of the README
    images = arrays.load_digits(image_size=8).test_images[:20]
    features = encoder.embed(images)

    reference_features, reference_z = embed.make_embed_fn(config)(variables, images)
    assert features.shape == (20, encoder.feature_dim) == (20, 32)
    np.testing.assert_allclose(features, reference_features, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(encoder.project(images), reference_z, rtol=1e-6, atol=1e-6)
    # Inputs of another size are resized to the encoder's, as in the monitor.
    big = arrays.load_digits(image_size=16).test_images[:4]
    np.testing.assert_allclose(encoder.embed(big),
                               embed.make_embed_fn(config)(variables, big)[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_official_moco_state_dict_round_trip_is_exact(head):
    """moco_jax -> the official `state_dict` layout -> moco_jax, no PyTorch."""
    config = tiny_config()
    config.model.head, config.model.stem, config.model.depth = head, "imagenet", 18
    variables = random_variables(config)
    state_dict = encoder_to_moco_state_dict(variables)
    assert ("module.encoder_q.fc.0.weight" in state_dict) == (head == "mlp")
    assert ("module.encoder_q.fc.weight" in state_dict) == (head == "linear")
    # What else an official checkpoint holds is ignored.
    state_dict.update({k.replace("encoder_q", "encoder_k"): -v for k, v in state_dict.items()})
    state_dict["module.queue"] = np.zeros((config.embed_dim, 64), np.float32)
    state_dict["module.queue_ptr"] = np.zeros((1,), np.int64)

    imported_config, imported = pretrained.load_variables(state_dict)
    assert_trees_equal(imported, variables)
    model = imported_config.model
    assert (model.depth, model.width, model.stem, model.head) == (18, 4, "imagenet", head)
    assert imported_config.embed_dim == config.embed_dim
    # Official weights are ImageNet-normalised.
    assert pretrained.Encoder(imported_config, imported).mean == (0.485, 0.456, 0.406)


def test_architecture_is_inferred_for_every_depth():
    for depth in models.ARCHITECTURES:
        config = tiny_config()
        config.model.depth = depth
        shapes = jax.eval_shape(lambda: methods.build_encoder(config).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        state_dict = torch_format.backbone_to_torchvision(models.backbone_variables(zeros))
        assert torch_format.infer_architecture(state_dict) == {"depth": depth, "width": 4, "stem": "cifar"}


def test_torchvision_file_has_no_head(tmp_path):
    config = tiny_config()
    path = str(tmp_path / "encoder.safetensors")
    formats.write_torchvision(path, config, random_variables(config))
    encoder = pretrained.load(path)
    assert not encoder.has_head
    images = arrays.load_digits(image_size=8).test_images[:3]
    assert encoder.embed(images).shape == (3, 32)
    with pytest.raises(ValueError, match="no projection head"):
        encoder.project(images)


def test_unknown_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained encoder"):
        pretrained.load(str(tmp_path / "missing.msgpack"))
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="don't know how to read"):
        pretrained.load(str(odd))
    with pytest.raises(ValueError, match="no ResNet found"):
        pretrained.load_variables({"module.encoder_q.fc.weight": np.zeros((2, 2))})

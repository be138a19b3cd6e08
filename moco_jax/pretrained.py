"""Pretrained MoCo encoders for downstream JAX code.

    from moco_jax import pretrained
    encoder = pretrained.load("encoder.msgpack")      # or a workdir, .safetensors, .pth.tar
    features = encoder.embed(images_uint8)           # (B, H, W, 3) uint8 -> (B, D) float32
    z = encoder.project(images_uint8)                # (B, embed_dim) unit-norm head outputs

`embed` applies the preprocessing the encoder was trained with (scale to
[0, 1], resize to the config's `crop_size` if needed, normalise with the
mean/std of the config's augmentation recipe) and runs the backbone with BN
in inference mode (a MoCo v3 ViT gives its [CLS] token after the final
LayerNorm), exactly as the in-training kNN monitor does
(`moco_jax.eval.embed`). `encoder.config` and `encoder.variables` are the raw
material for fine-tuning with `moco_jax.methods.build_encoder(config)`.

Every program takes the encoder the same way, as `--pretrained` (anything
`load` reads): `python -m moco_jax.export | knn_eval | linear_eval
--pretrained=W`.

Loading an exported file imports neither orbax nor the training loop; only
a pretraining workdir needs orbax.
"""

from moco_jax.eval.embed import Encoder, load
from moco_jax.io.formats import load_variables

# What `load` reads, in the words of every program's --pretrained flag.
SOURCES = ("a pretraining workdir (its newest checkpoint), a .msgpack (flax) or .safetensors (torchvision) export, "
           "or an official MoCo PyTorch checkpoint (.pth.tar, needs PyTorch)")
FLAG_HELP = f"The pretrained encoder: {SOURCES}."

__all__ = ["Encoder", "load", "load_variables", "SOURCES", "FLAG_HELP"]

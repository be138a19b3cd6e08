"""moco_jax: MoCo (Momentum Contrast) self-supervised pretraining in JAX/Flax.

Packages, each importing only those listed before it:

  core      what the methods build on: models, augmentation, training state, optimizer, config rules
  methods   the MoCo methods (v1/v2, v3), one module each behind one interface, and their registry
  data      datasets as `Source`s (in-memory arrays, image folders, tensorflow-datasets)
  io        checkpoints and encoder files (flax, torchvision, detectron2, official MoCo)
  eval      embeddings, weighted kNN, the linear probe
  training  the pretraining loop, its metrics and the console
  launch    the programs' command line (errors, --help), multi-process start-up, sweeps, summaries

Entry points: `pretrained` (load an encoder and embed images, for downstream
code), `torch_resnet` (the same encoder in PyTorch; imports torch, and nothing
here imports it), and the programs `python -m moco_jax.{train,export,knn_eval,
linear_eval,checkpoints,config_fields,plot,sweep}` (`train.py` at the
repository root runs `moco_jax.train`).
"""

__version__ = "0.2.0"

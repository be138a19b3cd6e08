"""moco_jax: MoCo (Momentum Contrast) self-supervised pretraining in JAX/Flax.

Packages, each importing only those listed before it:

  core      the method: models, augmentation, training state and step, optimizer, config helpers
  data      datasets as `Source`s (in-memory arrays, image folders, tensorflow-datasets)
  io        checkpoints and encoder files (flax, torchvision, detectron2, official MoCo)
  eval      embeddings, weighted kNN, the linear probe
  training  the pretraining loop and its metrics
  launch    multi-process start-up, sweeps

Entry points: `pretrained` (load an encoder and embed images, for downstream
code) and the programs `python -m moco_jax.{export,knn_eval,linear_eval,plot,sweep}`;
pretraining is `train.py` at the repository root.
"""

__version__ = "0.2.0"

"""The MoCo method: models, augmentation, the training state and step, the
optimizer, config helpers, and the host <-> device layout of the pmap axis.
Imports nothing else of moco_jax."""

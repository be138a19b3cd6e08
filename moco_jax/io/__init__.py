"""Reading and writing what training produces: checkpoints (`checkpoint`,
orbax; `saver` during a run; `workdirs`, where they are and what a workdir
has held; `integrity`, their verdicts), encoder files in flax, torchvision,
detectron2 and official MoCo layouts (`formats`), and the name mapping to
PyTorch (`torch_format`). Imports only `moco_jax.core`; orbax is imported by
`checkpoint`, `saver` and `integrity` alone."""

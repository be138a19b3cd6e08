"""Export a pretrained query encoder for downstream use.

  python -m moco_jax.export --workdir W --format flax        --output enc.msgpack
  python -m moco_jax.export --workdir W --format torchvision --output enc.safetensors
  python -m moco_jax.export --workdir W --format detectron2  --output enc.pkl

`--workdir` takes anything `moco_jax.pretrained.load` reads: a pretraining
workdir (its newest checkpoint), an exported file, or an official MoCo
PyTorch checkpoint (`.pth.tar`, needs PyTorch), so the same command converts
published weights. The formats are described in `moco_jax.io.formats`.
"""

from __future__ import annotations

import os

from absl import flags

from moco_jax.core.errors import ConfigError, NotFoundError
from moco_jax.io import formats
from moco_jax.launch import cli
from moco_jax.training.metrics import quiet_library_logs


def check_output(output: str, fmt: str) -> None:
    """The output must be a file in an existing directory; checked before the
    (possibly slow) read of the encoder."""
    if not output:
        raise ConfigError("--output is empty: give the file to write, e.g. --output=encoder.msgpack")
    output = formats.output_path(output, fmt)
    if os.path.isdir(output):
        raise ConfigError(f"--output={output} is a directory: give a file name, e.g. {os.path.join(output, 'encoder')}")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise NotFoundError(f"--output={output}: the directory {parent} does not exist; create it first")


def main(argv):
    del argv  # cli.run refuses extra arguments
    quiet_library_logs()
    f = flags.FLAGS
    check_output(f.output, f.format)
    path = formats.export(f.workdir, f.format, f.output, include_head=f.include_head)
    print(f"wrote {f.format} export of {f.workdir} to {path}")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so that importing this
    # module next to another program's flags (--workdir) cannot clash.
    flags.DEFINE_string("workdir", None, "Pretraining workdir, exported file or official MoCo .pth.tar.")
    flags.DEFINE_enum("format", "flax", sorted(formats.WRITERS), "Output format.")
    flags.DEFINE_string("output", None, "Output file (the format's file ending is added if missing).")
    flags.DEFINE_bool("include_head", True, "flax format: also export the projection head.")
    flags.mark_flags_as_required(["workdir", "output"])
    cli.run(main)

"""Export a pretrained query encoder for downstream use.

  python -m moco_jax.export --pretrained W --format flax        --output enc.msgpack
  python -m moco_jax.export --pretrained W --format torchvision --output enc.safetensors
  python -m moco_jax.export --pretrained W --format detectron2  --output enc.pkl

`--pretrained` takes anything `moco_jax.pretrained.load` reads, as in every
other program: a pretraining workdir (its newest checkpoint), an exported
file, or an official MoCo PyTorch checkpoint (`.pth.tar`, needs PyTorch), so
the same command converts published weights. `--workdir` is its old name,
still accepted for this release (with a one-line warning). The formats are
described in `moco_jax.io.formats`; every file is written whole, readable by
others as a plain `open()` would make it (0644 under umask 022).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from moco_jax import pretrained
from moco_jax.core.errors import ConfigError, NotFoundError
from moco_jax.io import formats
from moco_jax.launch import cli

RENAMED = "--workdir is now --pretrained"


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


def source_of(pretrained_flag: str | None, workdir_flag: str | None) -> str:
    """The encoder to export: --pretrained, or its old name --workdir; both
    naming different encoders, or neither, is a usage error."""
    if pretrained_flag and workdir_flag and pretrained_flag != workdir_flag:
        raise app.UsageError(f"--pretrained={pretrained_flag} and --workdir={workdir_flag} name different encoders: "
                             f"give --pretrained only ({RENAMED})")
    source = pretrained_flag or workdir_flag
    if not source:
        raise app.UsageError(f"--pretrained is required: {pretrained.FLAG_HELP} (see --helpshort)")
    return source


def main(argv):
    del argv  # cli.run refuses extra arguments
    f = flags.FLAGS
    source = source_of(f.pretrained, f.workdir)
    check_output(f.output, f.format)
    path = formats.export(source, f.format, f.output, include_head=f.include_head)
    print(f"wrote {f.format} export of {source} to {path}")
    if f.workdir:
        # After the export: a failed one reports its error as the one line of stderr.
        sys.stderr.write(f"warning: {RENAMED} (the old name still works for this release)\n")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so that importing this
    # module next to another program's flags (--workdir) cannot clash.
    flags.DEFINE_string("pretrained", None, pretrained.FLAG_HELP)
    flags.DEFINE_string("workdir", None, f"Deprecated: the old name of --pretrained ({RENAMED}).")
    flags.DEFINE_enum("format", "flax", sorted(formats.WRITERS), "Output format.")
    flags.DEFINE_string("output", None, "Output file (the format's file ending is added if missing); written "
                        "world-readable as a plain open() would (0644 under umask 022).")
    flags.DEFINE_bool("include_head", True, "flax format: also export the projection head.")
    flags.mark_flags_as_required(["output"])
    cli.run(main)

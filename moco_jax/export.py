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

from absl import app, flags

from moco_jax.io import formats
from moco_jax.training.metrics import quiet_library_logs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    f = flags.FLAGS
    try:
        path = formats.export(f.workdir, f.format, f.output, include_head=f.include_head)
    except (ValueError, FileNotFoundError) as e:  # a user error: the message, not a traceback
        raise SystemExit(f"export failed: {e}") from None
    print(f"wrote {f.format} export of {f.workdir} to {path}")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so that importing this
    # module next to another program's flags (--workdir) cannot clash.
    flags.DEFINE_string("workdir", None, "Pretraining workdir, exported file or official MoCo .pth.tar.")
    flags.DEFINE_enum("format", "flax", sorted(formats.WRITERS), "Output format.")
    flags.DEFINE_string("output", None, "Output file (the format's file ending is added if missing).")
    flags.DEFINE_bool("include_head", True, "flax format: also export the projection head.")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)

"""Every field of a config, with its value and the comment that documents it.

  python -m moco_jax.config_fields                                   # configs/default.py
  python -m moco_jax.config_fields --config configs/moco_v3_vit_small.py
  python -m moco_jax.config_fields --config configs/linear_cifar10.py --grep lr

Any field can be set on the command line of the program that reads the
config: `python train.py --config FILE --config.<field>=<value>`. The
comments are those of the `config.<field> = value  # comment` lines of the
config file and of the config files it builds on (configs/default.py).
"""

from __future__ import annotations

import os
import re

from absl import flags

from moco_jax.core.config import flatten_dotted
from moco_jax.launch import cli

# `config.model.width = 16  # filters of the first stage` -> ("model.width", "filters of ...")
_ASSIGNMENT = re.compile(r"^\s*config\.([\w.]+)\s*=[^#]*?(?:#\s*(.*))?$")
_IMPORT = re.compile(r"^\s*from\s+configs\s+import\s+([\w, ]+)|^\s*import\s+configs\.(\w+)")


def _related_files(path: str) -> list[str]:
    """`path` and, after it, the config files it imports (`from configs
    import default`), depth first: the first comment found wins."""
    files, todo = [], [os.path.abspath(path)]
    while todo:
        file = todo.pop(0)
        if file in files or not os.path.isfile(file):
            continue
        files.append(file)
        with open(file) as f:
            for line in f:
                match = _IMPORT.match(line)
                if match:
                    names = (match.group(1) or match.group(2)).split(",")
                    todo += [os.path.join(os.path.dirname(file), f"{n.strip()}.py") for n in names]
    return files


def field_comments(path: str) -> dict[str, str]:
    """field -> the comment of its assignment (trailing, else the comment
    lines right above it), over `path` and the config files it builds on."""
    comments: dict[str, str] = {}
    for file in _related_files(path):
        above: list[str] = []
        with open(file) as f:
            for line in f:
                if line.strip().startswith("#"):
                    above.append(line.strip().lstrip("#").strip())
                    continue
                match = _ASSIGNMENT.match(line)
                comment = (match.group(2) or " ".join(above)).strip() if match else ""
                if comment and match.group(1) not in comments:
                    comments[match.group(1)] = comment
                above = []
    return comments


def describe_fields(path: str, pattern: str = "") -> list[str]:
    """One line per field of the config file `path` (optionally only those
    whose name or comment contains `pattern`): `name = value  # comment`."""
    path = cli.resolve_config_path(path)
    values = flatten_dotted(cli.load_config_file(path).to_dict())
    comments = field_comments(path.partition(":")[0])
    rows = [(name, repr(value), comments.get(name, "")) for name, value in sorted(values.items())]
    if pattern:
        rows = [row for row in rows if pattern.lower() in (row[0] + " " + row[2]).lower()]
    width = max((len(f"{name} = {value}") for name, value, _ in rows), default=0)
    return [f"{f'{name} = {value}':<{width}}  # {comment}".rstrip(" #") for name, value, comment in rows]


def main(argv):
    del argv
    path = flags.FLAGS.config
    if not os.path.isfile(cli.resolve_config_path(path).partition(":")[0]):
        cli.fail(f"--config={path}: no such config file (e.g. configs/default.py)")
    lines = describe_fields(path, flags.FLAGS.grep)
    print(f"{path}: {len(lines)} fields; set any with --config.<field>=<value>")
    print("\n".join(lines))


if __name__ == "__main__":
    flags.DEFINE_string("config", os.path.join(cli.REPO_ROOT, "configs", "default.py"), "The config file to list.")
    flags.DEFINE_string("grep", "", "Only the fields whose name or comment contains this text.")
    cli.run(main)

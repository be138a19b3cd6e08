"""The package's shape: imports that only go downward, a downstream API that
loads without the training machinery, and an installable distribution."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moco_jax.io import formats
from test_pretrained import random_variables
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moco_jax"
# Each package may import only itself and the packages of lower rank; the
# top-level modules (the programs and `pretrained`) may import anything.
RANKS = {"core": 0, "methods": 1, "data": 2, "io": 2, "eval": 3, "training": 4, "launch": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The moco_jax modules `path` imports, at any depth of its code (lazy
    imports inside functions count too). The root `moco_jax/__init__.py`
    (a docstring and a version) is left out: `from moco_jax import data`
    imports the package `data`, not the root's code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m in known} - {"moco_jax"}


@pytest.fixture(scope="module")
def graph():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imported_modules(p, set(files)) - {m} for m, p in files.items()}


def package_of(module: str) -> str | None:
    """'moco_jax.eval.knn' -> 'eval'; None for the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else None


def test_the_graph_is_read(graph):
    """The parser sees imports, lazy ones inside functions included."""
    assert "moco_jax.methods" in graph["moco_jax.training.trainer"]
    assert "moco_jax.io.checkpoint" in graph["moco_jax.io.formats"]  # imported inside a function
    assert len(graph) > 30


def test_imports_only_go_downward(graph):
    wrong = []
    for module, imports in graph.items():
        package = package_of(module)
        if package is None:
            continue  # the programs and `pretrained` sit on top of everything
        for other in imports:
            other_package = package_of(other)
            if other_package != package and (other_package is None or RANKS[other_package] >= RANKS[package]):
                wrong.append(f"{module} -> {other}")
    assert not wrong, wrong


def test_the_method_and_the_architecture_are_asked_only_where_they_are_built():
    """No module outside the methods and the model builders branches on which
    method or which backbone it runs; core/config.py imports none of the
    modules whose fields it checks; and no module restates a field's default
    with `config.get(name, default)` except the reader of old configs."""
    code = {p.relative_to(ROOT).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    branching = [f for f, text in code.items() if ("is_vit(" in text or "method_of(" in text)
                 and not (f.startswith("moco_jax/methods/") or f == "moco_jax/core/models.py")]
    assert not branching, branching
    config_imports = {m for m in imported_modules(PACKAGE / "core" / "config.py", {module_name(p) for p in
                                                                                     PACKAGE.rglob("*.py")})}
    assert config_imports <= {"moco_jax.core.errors"}, config_imports
    defaults = [f for f, text in code.items() if re.search(r"\b(config|model_config|spec)\.get\(", text)
                and f not in ("moco_jax/io/old_configs.py", "moco_jax/torch_resnet.py")]  # readers of old files
    assert not defaults, defaults


def test_no_import_cycle(graph):
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_module_of_the_library_imports_the_training_loop(graph):
    importers = sorted(m for m, imports in graph.items() if "moco_jax.training.trainer" in imports)
    assert importers == ["moco_jax.train"], importers  # the program (train.py runs it) is its one user


def _run(code: str, cwd: Path, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


DOWNSTREAM = """
import sys
import numpy as np
from moco_jax import pretrained
encoder = pretrained.load(sys.argv[1] if len(sys.argv) > 1 else {path!r})
images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
features = encoder.embed(images)
assert features.shape == (5, encoder.feature_dim) and np.isfinite(features).all()
import moco_jax
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('orbax', 'tensorflow', 'torch')
               or m.startswith(('moco_jax.training', 'moco_jax.data.pipelines.tf', 'moco_jax.data.sources.tfds')))
print(moco_jax.__file__)
print('heavy:', heavy)
print('embedded', features.shape)
"""


@pytest.mark.parametrize("fmt", ["flax", "torchvision"])
def test_pretrained_embeds_without_orbax_or_the_training_loop(tmp_path, fmt):
    config = tiny_config()
    path = str(tmp_path / ("e.msgpack" if fmt == "flax" else "e.safetensors"))
    formats.WRITERS[fmt](path, config, random_variables(config))
    out = _run(DOWNSTREAM.format(path=path), ROOT)
    assert "heavy: []" in out and "embedded (5, 32)" in out, out


def test_pip_install_then_a_script_outside_the_repository_embeds_images(tmp_path):
    """`pip install .` into a fresh directory; a script elsewhere imports the
    installed package (not the checkout) and embeds images with an export."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "moco_jax", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(src)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "moco_jax" / "io" / "formats.py").is_file()  # the subpackages are in the distribution
    assert list(site.glob("moco_jax-*.dist-info"))

    config = tiny_config()
    exported = tmp_path / "encoder.msgpack"
    formats.write_flax(str(exported), config, random_variables(config))
    script_dir = tmp_path / "elsewhere"
    script_dir.mkdir()
    (script_dir / "downstream.py").write_text(DOWNSTREAM.format(path=str(exported)))
    out = subprocess.run([sys.executable, "downstream.py"], cwd=script_dir, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                                           "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0] == str(site / "moco_jax" / "__init__.py")
    assert "embedded (5, 32)" in out.stdout

"""The persistent compilation cache (moco_jax/launch/compilation_cache.py):
where --compilation_cache puts it, and that a relaunch of train.py on the
same machine compiles nothing: every program comes from the cache the first
launch wrote."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moco_jax.launch import compilation_cache

REPO = Path(__file__).resolve().parents[1]


def test_where_the_cache_goes(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for accelerator in ("gpu", "tpu"):
        assert compilation_cache.resolve("auto", accelerator) == str(tmp_path / "xdg" / "moco_jax" / "xla")
    assert compilation_cache.resolve("auto", "cpu") is None  # jaxlib 0.10's CPU executables crashed it
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation_cache.resolve("auto", "gpu") == os.path.join(os.path.expanduser("~"), ".cache", "moco_jax",
                                                                    "xla")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))  # the user's own JAX setting wins, also on a CPU
    assert compilation_cache.resolve("auto", "gpu") == compilation_cache.resolve("auto", "cpu") == str(tmp_path / "env")
    assert compilation_cache.resolve(str(tmp_path / "given"), "cpu") == str(tmp_path / "given")
    assert compilation_cache.resolve("off", "gpu") is compilation_cache.resolve("", "gpu") is None


def test_enable_and_disable_set_jax(tmp_path):
    """In a new process: turning JAX's cache on and off here would change it
    for the rest of this test process."""
    code = f"""
import jax
from moco_jax.launch import compilation_cache as cc
assert cc.enable({str(tmp_path / "cache")!r}) == {str(tmp_path / "cache")!r}
assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == {str(tmp_path / "cache")!r}
assert cc.enable("off") is None and not jax.config.jax_enable_compilation_cache
open({str(tmp_path / "file")!r}, "w").close()
assert cc.enable({str(tmp_path / "file" / "cache")!r}) is None  # cannot be created: off
assert not jax.config.jax_enable_compilation_cache
assert cc.enable("auto") is None and not jax.config.jax_enable_compilation_cache  # a CPU, no $JAX_COMPILATION_CACHE_DIR
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))  # conftest.py removed $JAX_COMPILATION_CACHE_DIR
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert (tmp_path / "cache").is_dir()


def _entries(cache: Path) -> dict[str, int]:
    """Each entry's name and modification time (a program compiled again would be written again)."""
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} if cache.exists() else {}


@pytest.mark.slow
def test_a_relaunch_compiles_nothing(tmp_path):
    """Two launches of the same run (2 steps on the digits, 8 CPU devices):
    the first stores its programs (step, kNN, embedding), the second, in a
    new process, stores none: it read every one back; with
    --compilation_cache=off nothing is stored."""
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # every program, however quick
    env.pop(compilation_cache.ENV, None)

    def launch(name, setting):
        args = [sys.executable, "train.py", f"--workdir={tmp_path / name}", "--config.num_train_steps=2",
                "--config.knn_max_train_images=64", f"--compilation_cache={setting}"]
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("first", str(cache))
    stored = _entries(cache)
    assert len(stored) >= 3, stored  # at least the step, the kNN and the embedding functions
    launch("second", str(cache))
    assert _entries(cache) == stored  # nothing compiled again
    launch("off", "off")
    assert _entries(cache) == stored


@pytest.mark.slow
def test_the_benchmark_reports_a_cold_and_a_warm_compile(tmp_path, monkeypatch):
    from benchmarks import compile_cache as bench

    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny step compiles in under 1 s
    rows = bench.main(["--models", "tiny", "--json", str(tmp_path / "rows.json")])
    assert [row["model"] for row in rows] == ["tiny"] and rows[0]["cache_entries"] >= 1
    assert rows[0]["cold_compile_s"] > 0 and rows[0]["warm_compile_s"] > 0

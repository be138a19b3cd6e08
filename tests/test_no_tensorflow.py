"""A GPU host without TensorFlow: every Python process of these tests
(train.py, its grain workers) runs with TensorFlow made invisible, as if it
were not installed, and must train on real JPEGs, resume exactly, write
TensorBoard event files, and read tensorflow-datasets ArrayRecord files.

TensorFlow is hidden by a `sitecustomize` module on PYTHONPATH that removes
it from the import system: `import tensorflow` fails with ModuleNotFoundError
and `importlib.util.find_spec("tensorflow")` is None (what tensorflow-datasets
and etils check). `sys.modules["tensorflow"] = None` is not enough for this:
tensorflow-datasets then believes TensorFlow is loaded.
"""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from configs import default
from moco_jax.training import metrics, trainer
from image_files import imagenette_or_skip
from test_checkpoint import _assert_states_equal, _latest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600
HIDE_TENSORFLOW = textwrap.dedent('''
    import atexit, importlib.machinery, sys

    class _HideTensorFlow(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [_HideTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    atexit.register(lambda: sys.stderr.write(f"\\nTENSORFLOW_LOADED={'tensorflow' in sys.modules}\\n"))
''')
# A tiny MoCo on 16 px host crops of the 400 ImageNet photos; a constant
# learning rate ("step" drops at epoch 120) so the schedule does not depend on
# the run's length, and a checkpoint every 3 steps.
RECIPE = dict(dataset="image_folder", train_split="train", eval_split="val", crop_size=16, image_size=16,
              batch_size=16, queue_size=32, bn_splits=1, embed_dim=8, lr_schedule="step", log_every_steps=1,
              checkpoint_every_steps=3, knn_max_train_images=64)


@pytest.fixture(scope="module")
def no_tf_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("hide_tensorflow")
    (site / "sitecustomize.py").write_text(HIDE_TENSORFLOW)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=8")


def run_without_tf(env, *args):
    """Run a Python command with TensorFlow hidden; returns (stdout, stderr),
    after checking it succeeded and never loaded TensorFlow."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TENSORFLOW_LOADED=False" in proc.stderr, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_tensorflow_is_really_hidden(no_tf_env):
    out, _ = run_without_tf(no_tf_env, "-c", textwrap.dedent('''
        import importlib.util
        assert importlib.util.find_spec("tensorflow") is None
        try:
            import tensorflow
        except ModuleNotFoundError:
            print("hidden")
    '''))
    assert out.strip() == "hidden"


def _flags(data_dir, num_steps):
    overrides = {**RECIPE, "data_dir": str(data_dir), "num_train_steps": num_steps}
    # One grain worker process here; the in-process reference below has none.
    return [f"--config.{k}={v}" for k, v in overrides.items()] + ["--config.model.width=4", "--config.input_workers=1"]


@pytest.mark.slow
def test_train_on_jpegs_resume_and_tensorboard_without_tensorflow(no_tf_env, tmp_path):
    """train.py through the grain image-folder source (worker processes
    included): 3 steps, then a relaunch to 6 that resumes from checkpoint 3
    and ends bit for bit where an uninterrupted 6-step run ends."""
    imagenette = imagenette_or_skip()
    workdir = tmp_path / "run"
    for steps in (3, 6):
        out, err = run_without_tf(no_tf_env, "train.py", f"--workdir={workdir}", *_flags(imagenette, steps))
    assert "decoded by grain" in err and "kNN accuracy" in out

    config = default.get_config()
    config.update({**RECIPE, "data_dir": str(imagenette), "num_train_steps": 6, "input_workers": 0})
    config.model.width = 4
    reference = trainer.train_and_evaluate(config, workdir=str(tmp_path / "reference"), show_progress=False)
    _assert_states_equal(_latest(workdir, config), _latest(tmp_path / "reference", config))
    logged = {r["step"]: r["loss"] for r in metrics.read_jsonl(str(workdir)) if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for record in reference["history"]:
        assert logged[record["step"]] == record["loss"], record["step"]
    final = json.loads((workdir / metrics.FINAL_NAME).read_text())
    assert final["step"] == 6 and final["knn_backbone"] == reference["knn_trained"]["backbone"]

    # TensorBoard event files, one per launch, read back here without TensorFlow too.
    events = sorted(workdir.glob("events.out.tfevents.*"))
    assert len(events) == 2
    out, _ = run_without_tf(no_tf_env, "-c", textwrap.dedent(f'''
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator({str(workdir)!r}); acc.Reload()
        print([(e.step, e.value) for e in acc.Scalars("loss")])
    '''))
    scalars = dict(ast.literal_eval(out.strip()))
    assert sorted(scalars) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([scalars[s] for s in range(1, 7)], [logged[s] for s in range(1, 7)], rtol=1e-6)


@pytest.mark.slow
def test_tfds_array_record_and_conversion_without_tensorflow(no_tf_env, tmp_path):
    """A tensorflow-datasets dataset (prepared here with TensorFlow, as on a
    TPU VM) converted from TFRecord to ArrayRecord and read through grain, in
    processes that cannot import TensorFlow."""
    from tfds_tiny import NAME, NUM_TRAIN, prepare

    tfrecord_dir = prepare(tmp_path / "tfrecord", "tfrecord")
    out, _ = run_without_tf(no_tf_env, "-m", "moco_jax.convert_tfds", f"--dataset_dir={tfrecord_dir}",
                            f"--out_data_dir={tmp_path / 'converted'}")
    assert f"--config.data_dir={tmp_path / 'converted'}" in out
    out, _ = run_without_tf(no_tf_env, "-c", textwrap.dedent(f'''
        from configs import default
        from moco_jax import data
        config = default.get_config()
        config.update(dict(dataset="{NAME}", data_dir={str(tmp_path / 'converted')!r}, crop_size=8, batch_size=8,
                           knn_max_train_images=8, input_workers=1))
        source = data.open_source(config)
        slots, views = next(source.train_batches(global_batch=8, seed=0, crop_size=8))  # resized on the device
        bank = source.labelled_arrays(size=8, max_train_images=8)
        print(source.loader, source.num_train_examples, slots.shape, views.shape, bank.train_images.shape,
              bank.num_classes)
    '''))
    assert out.split() == ["grain", str(NUM_TRAIN), "(1,", "8,", "256,", "3)", "(1,", "8,", "2,", "4)",
                           "(8,", "8,", "8,", "3)", "3"]


@pytest.mark.slow
def test_training_on_arrays_imports_no_tensorflow_even_where_it_is_installed(tmp_path):
    """The in-memory datasets' path (here: digits, 2 steps) never imports
    TensorFlow or tensorflow-datasets, so it pays neither's start-up."""
    code = textwrap.dedent(f'''
        import runpy, sys
        sys.argv = ["train.py", "--workdir={tmp_path / 'run'}", "--config.num_train_steps=2",
                    "--config.knn_max_train_images=64"]
        try:
            runpy.run_path("train.py", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        print(sorted(m for m in ("tensorflow", "tensorflow_datasets", "clu") if m in sys.modules))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))  # TensorBoard files all the same

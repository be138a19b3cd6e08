"""Every command-line program reports a user's mistake as one line.

A table of bad inputs to the six programs (train.py, export, kNN and linear
evaluation, plot, sweep); each must exit non-zero with exactly one
`error: ...` line on stderr naming the field, flag or file and what is
allowed, and no traceback. Each case fails at start-up: none may get as far
as building the model (`run_in_process` makes that an error).

Most cases run in this process (a program as `__main__`, with its flags
removed afterwards): a subprocess per case would cost the jax and tensorflow
imports each time. A few real subprocesses, one per program, check the top
level as a user sees it, and `--verbose` / $MOCO_JAX_VERBOSE the traceback.
"""

import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from absl import app, flags
from absl import logging as absl_logging

from moco_jax.core import models
from moco_jax.core import state as state_lib
from moco_jax.io import formats, torch_format
from moco_jax.launch import cli
from test_pretrained import random_variables
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = {  # name -> (how runpy runs it, what)
    "train": ("path", str(REPO / "train.py")),
    "export": ("module", "moco_jax.export"),
    "knn_eval": ("module", "moco_jax.knn_eval"),
    "linear_eval": ("module", "moco_jax.linear_eval"),
    "plot": ("module", "moco_jax.plot"),
    "sweep": ("module", "moco_jax.sweep"),
    "convert_tfds": ("module", "moco_jax.convert_tfds"),
}
USAGE, ERROR = 2, 1  # exit codes: flag / usage errors, everything else

SWEEP = """
from configs import default

def get_config():
    return default.get_config()

def get_sweep():
    return {points}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad (and a few good) files the cases name, in one folder."""
    root = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)
    junk = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    for name in ("junk.msgpack", "junk.safetensors", "junk.pth.tar", "weights.h5", "enc.pkl"):
        (root / name).write_bytes(junk)
    config = tiny_config()  # cifar stem: detectron2 refuses it
    variables = random_variables(config)
    formats.write_flax(str(root / "cifar.msgpack"), config, variables)
    data = (root / "cifar.msgpack").read_bytes()
    (root / "truncated.msgpack").write_bytes(data[: len(data) // 2])
    from flax import serialization
    from safetensors.numpy import save_file

    (root / "other.msgpack").write_bytes(serialization.msgpack_serialize({"weights": np.zeros(3)}))
    payload = serialization.msgpack_restore(data)
    payload["config"] = payload["config"].replace('"depth": 10', '"depth": 20')  # a hand-edited export
    (root / "edited.msgpack").write_bytes(serialization.msgpack_serialize(payload))
    save_file({"embeddings.weight": np.zeros((4, 2), np.float32)}, str(root / "notresnet.safetensors"))
    formats.write_torchvision(str(root / "tv.safetensors"), config, variables)
    save_file(torch_format.backbone_to_torchvision(models.backbone_variables(variables)),
              str(root / "plain.safetensors"))  # no metadata: an imported config, with no dataset
    for name in ("emptydir", "badmetrics", "emptymetrics", "out.msgpack"):
        (root / name).mkdir()
    (root / "badmetrics" / "metrics.jsonl").write_text("not json\nnor this\n")  # (a torn last line alone is skipped)
    (root / "emptymetrics" / "metrics.jsonl").write_text("")
    (root / "afile").write_text("not a directory")
    (root / "broken_config.py").write_text("def get_config(:\n")
    (root / "raising_config.py").write_text("def get_config():\n    raise RuntimeError('no config today')\n")
    sweeps = {
        "bad_field": [{"learning_rat": 0.1}],
        "bad_type": [{"model.width": "wide"}],
        "bad_value": [{"model.dtype": "float16"}],
        "bad_range": [{"learning_rate": 0.06}, {"learning_rate": -0.06}],
        "empty": [],
        "not_dicts": [1, 2],
        "duplicate": [{"seed": 1}, {"seed": 1}],
        "good": [{"seed": 1}],
    }
    for name, points in sweeps.items():
        (root / f"{name}_sweep.py").write_text(SWEEP.format(points=repr(points)))
    return root


def run_in_process(program: str, args: list[str]) -> int:
    """Run a program as `python <program> args` would, here; its exit status.

    The flags it defines are removed afterwards, the others reset, so the
    next program starts from the same flag set."""
    kind, target = PROGRAMS[program]
    app.define_help_flags()  # once per process in absl: keep them out of the per-run clean-up
    before, verbosity, argv = set(flags.FLAGS), absl_logging.get_verbosity(), sys.argv
    sys.argv = [target if kind == "path" else f"{target.replace('.', '/')}.py", *args]
    try:
        with warnings.catch_warnings():  # runpy: "found in sys.modules" for a module imported before
            warnings.simplefilter("ignore", RuntimeWarning)
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()
        cli._DEFAULTS.clear()
        absl_logging.set_verbosity(verbosity)


def assert_one_line_error(code: int, stderr: str, expected: int, substrings) -> None:
    assert code == expected, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert errors == lines, f"more than the error on stderr: {stderr}"
    for substring in substrings:
        assert substring in errors[0], (substring, errors[0])


T = "{tmp}"  # the files fixture's folder, in the arguments below
CASES = [
    # --- train.py: every field of a pretraining config, with what is allowed.
    ("train", ["--config.model.width=0"], ERROR, ["model.width=0", "an integer >= 1"]),
    ("train", ["--config.model.dtype=float16"], ERROR, ["model.dtype='float16'", "'float32', 'bfloat16'"]),
    ("train", ["--config.learning_rate=-1"], ERROR, ["learning_rate=-1.0", "a number > 0"]),
    ("train", ["--config.model.depth=20"], ERROR, ["model.depth=20", "one of 10, 18, 34, 50"]),
    ("train", ["--config.model.stem=resnet"], ERROR, ["model.stem='resnet'", "'imagenet', 'cifar'"]),
    ("train", ["--config.model.head=mlp3"], ERROR, ["model.head='mlp3'", "'linear', 'mlp'"]),
    ("train", ["--config.model.bn_momentum=1.0"], ERROR, ["model.bn_momentum=1.0", "[0, 1)"]),
    ("train", ["--config.embed_dim=0"], ERROR, ["embed_dim=0", ">= 1"]),
    ("train", ["--config.crop_size=0"], ERROR, ["crop_size=0", ">= 1"]),
    ("train", ["--config.crop_size=32"], ERROR, ["crop_size=32", "16x16 digits", "image_size >= 32"]),
    ("train", ["--config.image_size=-4"], ERROR, ["image_size=-4", ">= 0"]),
    ("train", ["--config.crop_scale=(0.8, 0.2)"], ERROR, ["crop_scale=(0.8, 0.2)", "0 < low <= high <= 1"]),
    ("train", ["--config.augmentation=simclr"], ERROR, ["augmentation='simclr'", "'moco_v1', 'moco_v2', 'cifar'"]),
    ("train", ["--config.lr_schedule=linear"], ERROR, ["lr_schedule='linear'", "'cosine', 'step'"]),
    ("train", ["--config.lr_drop_epochs=(-10, 160)"], ERROR, ["lr_drop_epochs=(-10, 160)", ">= 0"]),
    ("train", ["--config.warmup_epochs=-1"], ERROR, ["warmup_epochs=-1.0", ">= 0"]),
    ("train", ["--config.weight_decay=-0.1"], ERROR, ["weight_decay=-0.1", ">= 0"]),
    ("train", ["--config.weight_decay_mask=bias"], ERROR, ["weight_decay_mask='bias'", "'all', 'no_bn_bias'"]),
    ("train", ["--config.sgd_momentum=1.5"], ERROR, ["sgd_momentum=1.5", "[0, 1)"]),
    ("train", ["--config.num_epochs=0"], ERROR, ["num_epochs=0", "no training step"]),
    ("train", ["--config.log_every_steps=-1"], ERROR, ["log_every_steps=-1", ">= 0"]),
    ("train", ["--config.checkpoint_every_epochs=-2"], ERROR, ["checkpoint_every_epochs=-2.0", ">= 0"]),
    ("train", ["--config.knn_every_steps=5", "--config.knn_every_epochs=1"], ERROR,
     ["knn_every_steps=5 and knn_every_epochs=1.0", "set one of them"]),
    ("train", ["--config.checkpoints_to_keep=0"], ERROR, ["checkpoints_to_keep=0", ">= 1"]),
    ("train", ["--config.knn_k=0"], ERROR, ["knn_k=0", ">= 1"]),
    ("train", ["--config.knn_temperature=0"], ERROR, ["knn_temperature=0.0", "> 0"]),
    ("train", ["--config.eval_batch_size=0"], ERROR, ["eval_batch_size=0", ">= 1"]),
    ("train", ["--config.train_subset=-1"], ERROR, ["train_subset=-1", ">= 0"]),
    ("train", ["--config.knn_max_train_images=-1"], ERROR, ["knn_max_train_images=-1", ">= 0"]),
    ("train", ["--config.knn_center_crop_fraction=1.5"], ERROR, ["knn_center_crop_fraction=1.5", "(0, 1]"]),
    ("train", ["--config.shuffle_buffer=0"], ERROR, ["shuffle_buffer=0", ">= 1"]),
    ("train", ["--config.input_threads=-1"], ERROR, ["input_threads=-1", ">= 0"]),
    ("train", ["--config.shuffle_mode=ring"], ERROR, ["shuffle_mode='ring'", "'all_gather', 'all_to_all'"]),
    ("train", ["--config.seed=-1"], ERROR, ["seed=-1", ">= 0"]),
    ("train", ["--config.temperature=0"], ERROR, ["temperature=0.0", "> 0"]),
    ("train", ["--config.momentum=1.5"], ERROR, ["momentum=1.5", "[0, 1]"]),
    ("train", ["--config.batch_size=60"], ERROR, ["batch_size=60", "multiple of the device count (8)"]),
    ("train", ["--config.queue_size=100"], ERROR, ["queue_size=100", "multiple of batch_size=64"]),
    ("train", ["--config.bn_splits=-1"], ERROR, ["bn_splits=-1", ">= 0"]),
    ("train", ["--config.model.width=0", "--config.knn_k=0"], ERROR, ["model.width=0", "knn_k=0"]),  # all at once
    ("train", ["--config.batch_size=4096", "--config.queue_size=8192"], ERROR,
     ["batch_size=4096", "1438 examples"]),
    ("train", ["--config.dataset=image_folder"], ERROR, ["image_folder", "needs a data_dir"]),
    ("train", ["--config.dataset=image_folder", f"--config.data_dir={T}/nowhere"], ERROR,
     ["nowhere", "does not exist"]),
    ("train", ["--config.dataset=cifar10_arrays", "--config.image_size=32", f"--config.data_dir={T}/nowhere"], ERROR,
     ["CIFAR-10 mosaics not found", "nowhere"]),
    ("train", ["--config.dataset=cifar10_arrays", "--config.image_size=64"], ERROR, ["image_size=64", "0 or 32"]),
    ("train", ["--config.dataset=nosuch_dataset_xyz"], ERROR,
     ["nosuch_dataset_xyz", "not a tensorflow-datasets name"]),
    ("train", ["--config.data_loader=torch"], ERROR, ["data_loader='torch'", "'auto', 'grain', 'tf'"]),
    ("train", ["--config.input_workers=-2"], ERROR, ["input_workers=-2", ">= -1"]),
    # --- train.py: the command line itself.
    ("train", ["--config.nosuch=1"], USAGE, ["--config.nosuch", "no field 'nosuch'"]),
    ("train", ["--config.model.widht=3"], USAGE, ["model.widht", "did you mean model.width"]),
    ("train", ["--config.model.width=abc"], USAGE, ["--config.model.width=abc"]),
    ("train", ["--config=nonexist.py"], USAGE, ["nonexist.py", "no such config file"]),
    ("train", [f"--config={T}/broken_config.py"], USAGE, ["broken_config.py", "cannot be loaded", "SyntaxError"]),
    ("train", [f"--config={T}/raising_config.py"], USAGE, ["raising_config.py", "no config today"]),
    ("train", ["--nosuchflag=1"], USAGE, ["nosuchflag"]),
    ("train", ["stray"], USAGE, ["unexpected arguments: stray"]),
    ("train", ["--num_processes=2", "--process_id=5", "--coordinator_address=localhost:1"], ERROR,
     ["process_id=5", "[0, num_processes=2)"]),
    ("train", ["--num_processes=2"], ERROR, ["incomplete multi-process settings", "coordinator_address"]),
    # --- export: files that are not what their names say, and its flags.
    ("export", ["--workdir", f"{T}/junk.safetensors", "--format", "flax", "--output", f"{T}/x"], ERROR,
     ["junk.safetensors is not a torchvision ResNet", "safetensors file"]),
    ("export", ["--workdir", f"{T}/junk.msgpack", "--output", f"{T}/x"], ERROR,
     ["junk.msgpack is not a moco_jax flax export", "--format flax"]),
    ("export", ["--workdir", f"{T}/truncated.msgpack", "--output", f"{T}/x"], ERROR,
     ["truncated.msgpack is not a moco_jax flax export"]),
    ("export", ["--workdir", f"{T}/other.msgpack", "--output", f"{T}/x"], ERROR,
     ["other.msgpack is not a moco_jax flax export", "format is None"]),
    ("export", ["--workdir", f"{T}/notresnet.safetensors", "--output", f"{T}/x"], ERROR,
     ["notresnet.safetensors is not a torchvision ResNet", "no ResNet found"]),
    ("export", ["--workdir", f"{T}/junk.pth.tar", "--output", f"{T}/x"], ERROR,
     ["junk.pth.tar is not a MoCo PyTorch checkpoint", "torch.save"]),
    ("export", ["--workdir", f"{T}/missing.msgpack", "--output", f"{T}/x"], ERROR,
     ["no pretrained encoder at", "missing.msgpack"]),
    ("export", ["--workdir", f"{T}/weights.h5", "--output", f"{T}/x"], ERROR, ["weights.h5", ".safetensors"]),
    ("export", ["--workdir", f"{T}/enc.pkl", "--output", f"{T}/x"], ERROR, ["enc.pkl", "detectron2"]),
    ("export", ["--workdir", f"{T}/emptydir", "--output", f"{T}/x"], ERROR, ["emptydir"]),
    ("export", ["--workdir", f"{T}/cifar.msgpack", "--format", "detectron2", "--output", f"{T}/d"], ERROR,
     ["detectron2", "'cifar' stem"]),
    ("export", ["--workdir", f"{T}/cifar.msgpack", "--format", "onnx", "--output", f"{T}/x"], USAGE,
     ["--format", "detectron2|flax|torchvision"]),
    ("export", ["--workdir", f"{T}/cifar.msgpack", "--output", f"{T}/nodir/x"], ERROR, ["nodir", "does not exist"]),
    ("export", ["--workdir", f"{T}/cifar.msgpack", "--output", f"{T}/out.msgpack"], ERROR,
     ["out.msgpack is a directory"]),
    ("export", ["--workdir", f"{T}/cifar.msgpack"], USAGE, ["--output"]),
    # --- knn_eval.
    ("knn_eval", [f"--pretrained={T}/junk.msgpack"], ERROR, ["junk.msgpack is not a moco_jax flax export"]),
    ("knn_eval", [f"--pretrained={T}/edited.msgpack"], ERROR,
     ["edited.msgpack is not a moco_jax flax export", "model.depth=20 must be one of 10, 18, 34, 50"]),
    ("knn_eval", [f"--pretrained={T}/cifar.msgpack", "--k=0"], ERROR, ["--k=0", "an integer >= 1"]),
    ("knn_eval", [f"--pretrained={T}/cifar.msgpack", "--temperature=0"], ERROR, ["--temperature=0.0", "> 0"]),
    ("knn_eval", [f"--pretrained={T}/cifar.msgpack", "--batch_size=0"], ERROR, ["--batch_size=0", ">= 1"]),
    ("knn_eval", [f"--pretrained={T}/tv.safetensors", "--features=projection"], ERROR,
     ["no projection head", "--features=backbone"]),
    ("knn_eval", [f"--pretrained={T}/plain.safetensors"], ERROR, ["names no dataset", "--dataset"]),
    ("knn_eval", [f"--pretrained={T}/cifar.msgpack", "--dataset=image_folder"], ERROR, ["--data_dir=ROOT"]),
    ("knn_eval", [f"--pretrained={T}/cifar.msgpack", "--features=all"], USAGE, ["--features", "both"]),
    ("knn_eval", [], USAGE, ["--pretrained"]),
    # --- linear_eval: the linear-probe config's fields.
    ("linear_eval", [], USAGE, ["--config"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py"], USAGE, ["--pretrained is required"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", "--config.mode=fast"], ERROR,
     ["mode='fast'", "'full', 'features'"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", "--config.learning_rate=0"], ERROR,
     ["learning_rate=0.0", "> 0"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", "--config.eval_crop_fraction=0"], ERROR,
     ["eval_crop_fraction=0.0", "(0, 1]"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", "--config.train_crop_scale=(0.0, 1.0)"], ERROR,
     ["train_crop_scale=(0.0, 1.0)"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", "--config.batch_size=12"], ERROR,
     ["batch_size=12", "device count"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", "--config.max_train_images=-1"], ERROR,
     ["max_train_images=-1"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", "--config.nosuch=1"], USAGE, ["no field 'nosuch'"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", f"--config.pretrained={T}/junk.msgpack"], ERROR,
     ["junk.msgpack is not a moco_jax flax export"]),
    ("linear_eval", ["--config=configs/linear_cifar10.py", f"--config.pretrained={T}/cifar.msgpack",
                     "--config.dataset=image_folder", f"--config.data_dir={T}/nowhere"], ERROR, ["nowhere"]),
    # --- plot.
    ("plot", ["--workdir", f"{T}/nowhere"], ERROR, ["nowhere", "does not exist"]),
    ("plot", ["--workdir", f"{T}/emptydir"], ERROR, ["emptydir has no metrics.jsonl"]),
    ("plot", ["--workdir", f"{T}/badmetrics"], ERROR, ["badmetrics/metrics.jsonl is not a metrics log"]),
    ("plot", ["--workdir", f"{T}/emptymetrics"], ERROR, ["no records"]),
    ("plot", [], USAGE, ["--workdir"]),
    # --- convert_tfds: what it is pointed at.
    ("convert_tfds", [], USAGE, ["--dataset_dir"]),
    ("convert_tfds", [f"--dataset_dir={T}/emptydir", f"--out_data_dir={T}/out"], ERROR,
     ["emptydir is not a prepared tensorflow-datasets dataset", "NAME/VERSION"]),
    # --- sweep: the config file and its grid, before any point runs.
    ("sweep", ["--config=configs/default.py", f"--workdir={T}/sw"], ERROR, ["default.py defines no get_sweep()"]),
    ("sweep", [f"--config={T}/bad_field_sweep.py", f"--workdir={T}/sw"], ERROR,
     ["learning_rat", "did you mean learning_rate"]),
    ("sweep", [f"--config={T}/bad_type_sweep.py", f"--workdir={T}/sw"], ERROR, ["model.width='wide'", "int"]),
    ("sweep", [f"--config={T}/bad_value_sweep.py", f"--workdir={T}/sw", "--dry_run"], ERROR,
     ["model.dtype='float16'", "'float32', 'bfloat16'"]),
    ("sweep", [f"--config={T}/bad_range_sweep.py", f"--workdir={T}/sw"], ERROR, ["learning_rate=-0.06"]),
    ("sweep", [f"--config={T}/empty_sweep.py", f"--workdir={T}/sw"], ERROR, ["no points"]),
    ("sweep", [f"--config={T}/not_dicts_sweep.py", f"--workdir={T}/sw"], ERROR, ["dict of field name"]),
    ("sweep", [f"--config={T}/duplicate_sweep.py", f"--workdir={T}/sw"], ERROR, ["duplicate sweep point"]),
    ("sweep", [f"--config={T}/nonexist.py", f"--workdir={T}/sw"], ERROR, ["nonexist.py does not exist"]),
    ("sweep", [f"--config={T}/broken_config.py", f"--workdir={T}/sw"], ERROR, ["broken_config.py", "SyntaxError"]),
    ("sweep", [f"--config={T}/good_sweep.py", f"--workdir={T}/afile"], ERROR, ["afile is a file"]),
    ("sweep", [f"--config={T}/good_sweep.py"], USAGE, ["--workdir"]),
]


def _case_id(case):
    program, args = case[0], case[1]
    return f"{program}:{' '.join(a.replace(T + '/', '') for a in args)[:60]}"


@pytest.mark.parametrize("program, args, code, substrings", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_gives_one_line(program, args, code, substrings, files, capfd, monkeypatch):
    def no_training(*_, **__):
        raise AssertionError("the run got past start-up: this case is not a start-up error")

    monkeypatch.setattr(state_lib, "create_train_state", no_training)
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(cli.ENV_VERBOSE, raising=False)
    args = [a.replace(T, str(files)) for a in args]
    status = run_in_process(program, args)
    assert_one_line_error(status, capfd.readouterr().err, code, substrings)


def test_missing_pytorch_is_one_line(files, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    status = run_in_process("export", ["--workdir", f"{files}/junk.pth.tar", "--output", f"{files}/x"])
    assert_one_line_error(status, capfd.readouterr().err, ERROR, ["junk.pth.tar needs PyTorch", "pip install torch"])


def test_verbose_environment_variable_shows_the_traceback(files, capfd, monkeypatch):
    monkeypatch.setenv(cli.ENV_VERBOSE, "1")
    with pytest.raises(Exception, match="is not a moco_jax flax export") as error:
        run_in_process("knn_eval", [f"--pretrained={files}/junk.msgpack"])
    assert type(error.value).__name__ == "InputError"


# ---------------------------------------------------------------------------
# Real processes: what a user sees.
# ---------------------------------------------------------------------------
SUBPROCESS_CASES = {
    "train": (["train.py", "--config.model.width=0"], ERROR, ["model.width=0"]),
    "export": (["-m", "moco_jax.export", "--workdir", f"{T}/junk.safetensors", "--format", "flax",
                "--output", f"{T}/x"], ERROR, ["junk.safetensors is not a torchvision ResNet"]),
    "knn_eval": (["-m", "moco_jax.knn_eval", f"--pretrained={T}/junk.msgpack"], ERROR,
                 ["junk.msgpack is not a moco_jax flax export"]),
    "linear_eval": (["-m", "moco_jax.linear_eval", "--config=configs/linear_cifar10.py", "--config.mode=fast"],
                    ERROR, ["mode='fast'"]),
    "plot": (["-m", "moco_jax.plot", f"--workdir={T}/emptydir"], ERROR, ["no metrics.jsonl"]),
    "sweep": (["-m", "moco_jax.sweep", "--config=configs/default.py", f"--workdir={T}/sw"], ERROR,
              ["no get_sweep()"]),
    "convert_tfds": (["-m", "moco_jax.convert_tfds", f"--dataset_dir={T}/emptydir", f"--out_data_dir={T}/out"],
                     ERROR, ["is not a prepared tensorflow-datasets dataset"]),
    "verbose": (["train.py", "--config.model.width=0", "--verbose"], ERROR, None),
}


@pytest.fixture(scope="module")
def processes(files):
    """All the subprocess cases, started at once (their imports dominate)."""
    env = {k: v for k, v in os.environ.items() if k != cli.ENV_VERBOSE}
    started = {}
    for name, (args, _, _) in SUBPROCESS_CASES.items():
        args = [a.replace(T, str(files)) for a in args]
        started[name] = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for name, process in started.items():
        _, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stderr)
    return results


@pytest.mark.parametrize("name", [n for n in SUBPROCESS_CASES if n != "verbose"])
def test_program_prints_one_line_and_exits_non_zero(name, processes):
    _, code, substrings = SUBPROCESS_CASES[name]
    assert_one_line_error(*processes[name], code, substrings)


def test_verbose_flag_shows_the_traceback(processes):
    status, stderr = processes["verbose"]
    assert status != 0
    assert "Traceback (most recent call last)" in stderr and "ConfigError: model.width=0" in stderr, stderr

"""Checkpoints read by a new process, for each kind of model: one train.py
process is stopped by SIGTERM after a step and saves it; a second resumes
and ends bit-exact with an uninterrupted run; a third exports the encoder
and evaluates it. And the checksums of one state are the same in any process."""

import json
import os
import signal
import subprocess
import sys

import jax
import pytest

from configs import default, moco_v3_tiny
from moco_jax.training import metrics, trainer
from test_checkpoint import _assert_states_equal, _latest
from test_signals import _finish, _start, _when_paused
from test_workdir_lock import REPO, TINY_FLAGS
from tiny import tiny_config

pytestmark = pytest.mark.slow
TIMEOUT = 240
RUN = dict(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=1, knn_max_train_images=256)
V3_RESNET = dict(method="moco_v3", queue_size=0, shuffle_bn=False, optimizer="lars", weight_decay_mask="no_bn_bias",
                 temperature=1.0, momentum_schedule="cosine", augmentation="cifar_v3")
V3_VIT = {k: v for k, v in moco_v3_tiny.get_config().to_dict().items()
          if k in ("method", "queue_size", "shuffle_bn", "optimizer", "weight_decay", "weight_decay_mask",
                   "temperature", "momentum", "momentum_schedule", "augmentation", "learning_rate", "warmup_epochs",
                   "embed_dim")}
CASES = {
    "moco_v2_resnet": ({}, {}),
    "moco_v3_resnet": (V3_RESNET, {"sync_bn": True, "mlp_dim": 16}),
    "moco_v3_vit": (V3_VIT, {"arch": "vit", "vit": "test", "patch_size": 4, "stop_grad_patch": True,
                             "mlp_dim": 16}),
}


def _config(case):
    fields, model = CASES[case]
    config = tiny_config(**RUN, **fields)
    config.model.update(model)
    if model.get("arch") == "vit":  # as train.py runs it: the ResNet fields are left at configs/default.py's
        config.model.width, config.model.depth = default.get_config().model.width, default.get_config().model.depth
    return config


def _flags(case):
    fields, model = CASES[case]
    values = {**RUN, **fields, **{f"model.{k}": v for k, v in model.items()}}
    return [f"--config.{k}={v}" for k, v in values.items()]


def _tiny_flags(case):
    """TINY_FLAGS, less the ResNet fields that a ViT refuses (it would ignore them)."""
    if CASES[case][1].get("arch") != "vit":
        return TINY_FLAGS
    return [f for f in TINY_FLAGS if not f.startswith(("--config.model.width=", "--config.model.depth="))]


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_stopped_by_sigterm_resumes_in_a_new_process_and_its_encoder_serves_a_third(tmp_path, case):
    workdir = tmp_path / "run"
    first = _start(workdir, "step:3", *_flags(case), tiny=_tiny_flags(case))
    _when_paused(first)
    first.send_signal(signal.SIGTERM)
    status, out, err = _finish(first)
    assert status == 0 and out.strip().splitlines()[-1].startswith("stopped by SIGTERM after step 3"), err[-3000:]
    stored = workdir / metrics.KNN_RANDOM_NAME  # the random-init kNN, measured by the first process
    written = (stored.stat().st_ino, stored.stat().st_mtime_ns, stored.read_text())

    second = subprocess.run([sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *_tiny_flags(case),
                             *_flags(case)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "damaged" not in second.stderr and "set aside" not in second.stderr
    assert [r["step"] for r in metrics.read_jsonl(str(workdir)) if "loss" in r] == [1, 2, 3, 4]

    config = _config(case)
    reference = trainer.train_and_evaluate(config, workdir=str(tmp_path / "reference"), show_progress=False)
    resumed = _latest(workdir, config)
    assert int(resumed.step) == 4
    _assert_states_equal(resumed, reference["state"])
    final = json.loads((workdir / metrics.FINAL_NAME).read_text())
    assert final["loss"] == reference["history"][-1]["loss"]
    # The second process read the random-init kNN back rather than measuring it again.
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns, stored.read_text()) == written
    knn_random = json.loads(written[2])["knn_random"]
    assert {k: final[f"knn_random_{k}"] for k in knn_random} == knn_random == reference["knn_random"]

    exported = tmp_path / "encoder.msgpack"
    third = subprocess.run([sys.executable, "-c", EXPORT_AND_EVALUATE, str(workdir), str(exported)], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert third.returncode == 0, third.stderr[-3000:]
    accuracy = json.loads(third.stdout.strip().splitlines()[-1])
    assert exported.exists() and set(accuracy) == {"backbone", "projection"}
    assert abs(accuracy["backbone"] - final["knn_backbone"]) < 0.02, (accuracy, final)


# The third process: the exported file, read back and evaluated as knn_eval does (over the monitor's bank:
# knn_eval's is the whole train split unless --max_train_images caps it).
EXPORT_AND_EVALUATE = """
import json, sys
from moco_jax import knn_eval, pretrained
from moco_jax.io import formats
encoder = pretrained.load(formats.export(sys.argv[1], "flax", sys.argv[2]))
bank = knn_eval.load_dataset(encoder, max_train_images=encoder.config.knn_max_train_images)  # the monitor's bank
print(json.dumps(encoder.knn_accuracies(bank)))
"""


DIGESTS = """
import json, sys
sys.path[:0] = ["tests"]
import jax, numpy as np
from flax import serialization
from moco_jax.core import models, optim, state as state_lib
from moco_jax.io import digests
from moco_jax import methods
from test_resume_across_processes import _config
config = _config(sys.argv[1])
tx, _ = optim.make_optimizer(config, 10)
state = state_lib.create_train_state(jax.random.key(0), methods.build_encoder(config), tx, (8, 8, 3),
                                     config.queue_size, config.embed_dim)
print(json.dumps(digests.array_digests(jax.tree.map(np.asarray, serialization.to_state_dict(state)))))
"""


def test_the_checksums_of_one_state_are_the_same_in_two_processes():
    """MoCo v3's state has None leaves (no queue); moco_jax 0.2 hashed them by
    address, so every v3 checkpoint failed verification in a new process."""
    def digests_in_a_new_process():
        run = subprocess.run([sys.executable, "-c", DIGESTS, "moco_v3_vit"], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    first, second = digests_in_a_new_process(), digests_in_a_new_process()
    assert first == second
    assert first["queue"] == first["queue_ptr"] == "none" and len(first) > 20
    assert jax.device_count() == 8

"""Writes the moco_jax 0.2 checkpoints of this folder (run once, at commit
caa3072, the last 0.2 commit; tests/test_checkpoint.py reads them):

    git checkout caa3072 && python tests/data/checkpoints_0.2/make.py OUT

A MoCo v2 and a MoCo v3 (ResNet, LARS, SyncBN) run of 2 steps on 2 emulated
devices; OUT/<name>/checkpoints and checkpoint_history.json were copied here.
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from moco_jax.training import trainer  # noqa: E402
from tiny import tiny_config  # noqa: E402

out = sys.argv[1]
v2 = tiny_config(num_train_steps=2, checkpoint_every_steps=2, batch_size=4, queue_size=8, eval_batch_size=64,
                 knn_max_train_images=64)
trainer.train_and_evaluate(v2, os.path.join(out, "moco_v2_resnet"), show_progress=False)
v3 = tiny_config(num_train_steps=2, checkpoint_every_steps=2, batch_size=4, eval_batch_size=64, knn_max_train_images=64,
                 method="moco_v3", queue_size=0, shuffle_bn=False, optimizer="lars", weight_decay_mask="no_bn_bias",
                 temperature=1.0, momentum_schedule="cosine", augmentation="cifar_v3")
v3.model.sync_bn = True
v3.model.mlp_dim = 16
trainer.train_and_evaluate(v3, os.path.join(out, "moco_v3_resnet"), show_progress=False)

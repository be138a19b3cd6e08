"""MoCo v3 at the size of a unit test: a tiny ViT on scikit-learn's digits.

The v3 recipe of configs/moco_v3_vit_small.py (AdamW, warm-up + cosine,
cosine momentum from 0.99, T = 0.2, frozen patch projection, the asymmetric
augmentation without blur) on the 8x8 digits upsampled to 16x16, with the
"test" ViT (width 32, 2 blocks, 2 heads, 4x4 patches: 16 tokens) and MLP
heads of width 64 to 32-d. Used by the tests; runs anywhere in seconds.

Run:
  python train.py --config configs/moco_v3_tiny.py

Expected (2-core CPU, 30 s in all on an idle machine, up to a minute on a
busy one): the weighted kNN accuracy (k=200, T=0.1) on the 359 held-out
digits rises from 42.1% (backbone) / 39.6% (projection) for the randomly
initialised ViT to 59.6-60.4% / 51.8-59.6% (the range seen on 2-core VMs,
2026-12-02 and 12-06). (At the learning rate of the ImageNet ViTs, 1.5e-4 per 256,
this 2-block model barely moves in 20 epochs; 1.5e-2 is what it wants.)
"""

from configs import default


def get_config():
    config = default.get_config()
    config.method = "moco_v3"
    config.model.arch = "vit"
    config.model.vit = "test"
    config.model.patch_size = 4
    config.model.stop_grad_patch = True
    config.model.mlp_dim = 64
    config.embed_dim = 32
    config.augmentation = "cifar_v3"
    config.crop_scale = (0.5, 1.0)  # digits (as configs/default.py)
    config.queue_size = 0
    config.shuffle_bn = False
    config.bn_splits = 1
    config.temperature = 0.2
    config.momentum = 0.99
    config.momentum_schedule = "cosine"
    config.optimizer = "adamw"
    config.learning_rate = 1.5e-2  # per 256; 100x the ImageNet ViTs' rate: a 2-block model, a short run
    config.weight_decay = 0.1
    config.warmup_epochs = 2.0
    config.num_epochs = 20
    return config

"""MoCo v3, ResNet-50 on ImageNet-1k: the paper's recipe (CONFIG.md, 300 epochs).

torchvision's ResNet-50 with `zero_init_residual=True` and every BN a SyncBN
(the official `convert_sync_batchnorm` converts the backbone's too); a
2-layer projector and a 2-layer predictor (no last BN) of width 4096 to
256-d; T = 1.0; momentum 0.99 -> 1 (cosine); LARS (trust 0.001, momentum
0.9), lr 0.3 per 256 images (0.6 for 100 epochs), weight decay 1e-6, biases
and BN parameters excluded from both decay and adaptation; 10 warm-up
epochs then cosine; batch 4096; 300 epochs; the asymmetric augmentation
with crop scale 0.2-1 (`--crop-min=.2`); bfloat16 compute.

Run:
  python train.py --config configs/moco_v3_r50.py --workdir /ckpt/moco_v3_r50 \
      --config.data_dir /data/tfds
  (100 epochs: --config.num_epochs=100 --config.learning_rate=0.6;
   1000 epochs: --config.num_epochs=1000 --config.weight_decay=1.5e-6 --config.momentum=0.996)

Expected: 72.8% linear top-1 at 300 epochs (68.9% at 100, 74.6% at 1000; CONFIG.md).
"""

from configs import moco_v3_vit_small


def get_config():
    config = moco_v3_vit_small.get_config()
    config.model.arch = "resnet"
    config.model.depth = 50
    config.model.width = 64
    config.model.stem = "imagenet"
    config.model.sync_bn = True
    config.model.zero_init_residual = True
    config.model.stop_grad_patch = False
    config.crop_scale = (0.2, 1.0)
    config.temperature = 1.0
    config.optimizer = "lars"
    config.learning_rate = 0.3
    config.weight_decay = 1e-6
    config.weight_decay_mask = "no_bn_bias"  # the official LARS: p.ndim <= 1 neither decayed nor adapted
    config.warmup_epochs = 10.0
    return config

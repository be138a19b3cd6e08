"""MoCo v3, ViT-Base/16 on ImageNet-1k: the paper's recipe (CONFIG.md).

configs/moco_v3_vit_small.py with ViT-Base/16 (width 768, 12 blocks, 12
heads): AdamW lr 1.5e-4 per 256 images, weight decay 0.1, 40 warm-up
epochs, 300 epochs, batch 4096, T = 0.2, momentum 0.99 -> 1 (cosine),
frozen patch projection.

Run:
  python train.py --config configs/moco_v3_vit_base.py --workdir /ckpt/moco_v3_vitb \
      --config.data_dir /data/tfds

Expected: 76.7% linear top-1 at 300 epochs (batch 4096; CONFIG.md).
"""

from configs import moco_v3_vit_small


def get_config():
    config = moco_v3_vit_small.get_config()
    config.model.vit = "base"
    return config

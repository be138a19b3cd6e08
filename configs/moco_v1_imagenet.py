"""MoCo v1 on ImageNet-1k: the paper's recipe (He et al. 2020, arXiv:1911.05722).

ResNet-50, linear head to 128-d, T=0.07, K=65536, m=0.999, batch 256, SGD
lr 0.03 per 256 images, x0.1 at epochs 120 and 160, weight decay 1e-4 on all
parameters, 200 epochs, the MoCo v1 augmentation (no blur, jitter 0.4 with
hue 0.4, always applied). Per-device BN with shuffle BN.

Run:
  python train.py --config configs/moco_v1_imagenet.py --workdir /ckpt/moco_v1 \
      --config.data_dir /data/tfds

Expected: 60.6% linear top-1 (paper, 200 epochs; 60.8-61% in the reference
repository's runs), evaluated with configs/linear_imagenet.py.
"""

from configs import moco_v2_imagenet


def get_config():
    config = moco_v2_imagenet.get_config()
    config.augmentation = "moco_v1"
    config.model.head = "linear"
    config.temperature = 0.07
    config.lr_schedule = "step"
    config.lr_drop_epochs = (120, 160)
    return config

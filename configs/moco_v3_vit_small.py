"""MoCo v3, ViT-Small/16 on ImageNet-1k: the paper's recipe (Chen, Xie and He,
ICCV 2021, arXiv:2104.02057; facebookresearch/moco-v3 CONFIG.md).

ViT-Small/16 (width 384, 12 blocks, 12 heads: moco-v3's, where timm's has 6),
fixed 2-D sin-cos position embeddings, a frozen random patch projection
(`--stop-grad-conv1`); a 3-layer projector and a 2-layer predictor of width
4096 to 256-d, SyncBN in both; T = 0.2; momentum 0.99 -> 1 on a cosine
(`--moco-m-cos`); AdamW, lr 1.5e-4 per 256 images (x 4096 / 256 = 2.4e-3),
weight decay 0.1 on every parameter (the official AdamW has no exclusions),
40 warm-up epochs then cosine, 300 epochs, batch 4096; the asymmetric
BYOL-style augmentation (blur p 1.0 / 0.1, solarisation 0 / 0.2,
crop scale 0.08-1); bfloat16 compute with float32 parameters.

Run (ImageNet as tensorflow-datasets ArrayRecord files, or an image folder
as in configs/moco_v2_imagenet.py):
  python train.py --config configs/moco_v3_vit_small.py --workdir /ckpt/moco_v3_vits \
      --config.data_dir /data/tfds
The 1-node setting of CONFIG.md (8 GPUs): --config.batch_size=1024 (the
learning rate follows it: `learning_rate` is per 256 images).

Expected: 73.2% linear top-1 at 300 epochs (batch 4096; CONFIG.md), with
configs/linear_imagenet.py using the [CLS] features (--pretrained=W).

Departures from the official code: bfloat16 where it uses float16 autocast
with a loss scaler (bfloat16 needs no scaling); the momentum and learning
rate change every step as in the official per-iteration schedules.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.method = "moco_v3"
    config.dataset = "imagenet2012"
    config.data_dir = ""
    config.image_size = 224
    config.crop_size = 224
    config.crop_scale = (0.08, 1.0)
    config.augmentation = "moco_v3"
    config.eval_split = "validation"
    config.knn_center_crop_fraction = 0.875
    config.knn_max_train_images = 10000

    config.model.arch = "vit"
    config.model.vit = "small"
    config.model.patch_size = 16
    config.model.stop_grad_patch = True
    config.model.mlp_dim = 4096
    config.model.dtype = "bfloat16"
    config.embed_dim = 256
    config.bn_splits = 1

    config.queue_size = 0
    config.shuffle_bn = False
    config.temperature = 0.2
    config.momentum = 0.99
    config.momentum_schedule = "cosine"

    config.optimizer = "adamw"
    config.batch_size = 4096
    config.learning_rate = 1.5e-4  # per 256 images
    config.weight_decay = 0.1
    config.weight_decay_mask = "all"
    config.lr_schedule = "cosine"
    config.warmup_epochs = 40.0
    config.num_epochs = 300

    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.knn_every_steps = 0
    config.eval_batch_size = 1024
    return config

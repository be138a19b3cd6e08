"""MoCo v2 on ImageNet-1k: the paper's recipe (Chen et al. 2020, arXiv:2003.04297).

ResNet-50, MLP head, T=0.2, K=65536, m=0.999, batch 256, SGD lr 0.03 per 256
images with a cosine schedule, weight decay 1e-4 on all parameters, 200
epochs, the MoCo v2 augmentation (blur, jitter p=0.8). Per-device BN with
shuffle BN, as the reference on 8 GPUs (32 images per device).

Run (ImageNet prepared for tensorflow-datasets as ArrayRecord files, read by
grain without TensorFlow; docs/data.md says how to prepare or convert it):
  python train.py --config configs/moco_v2_imagenet.py --workdir /ckpt/moco_v2 \
      --config.data_dir /data/tfds
or from a folder of JPEGs (ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG):
  python train.py --config configs/moco_v2_imagenet.py --workdir /ckpt/moco_v2 \
      --config.dataset=image_folder --config.data_dir=ROOT --config.eval_split=val

Expected: 67.5% linear top-1 (paper, 200 epochs, 8 V100s, about 53 hours),
evaluated with configs/linear_imagenet.py. A bigger global batch scales the
learning rate linearly (`learning_rate` is per 256 images).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "imagenet2012"
    config.data_dir = ""
    config.image_size = 224
    config.crop_size = 224
    config.crop_scale = (0.2, 1.0)
    config.augmentation = "moco_v2"
    config.eval_split = "validation"  # imagenet2012 has no test split
    config.knn_center_crop_fraction = 0.875  # the usual resize-256 / center-crop-224 view
    config.knn_max_train_images = 10000  # kNN bank: 10k un-augmented train images (memory)

    config.model.depth = 50
    config.model.width = 64
    config.model.stem = "imagenet"
    config.model.head = "mlp"
    config.model.dtype = "bfloat16"  # float32 params and BN statistics
    config.embed_dim = 128
    config.bn_splits = 0  # auto: 8 BN groups in all, as the paper's 8 GPUs (1 per device from 8 devices on)

    config.queue_size = 65536
    config.temperature = 0.2
    config.momentum = 0.999

    config.batch_size = 256
    config.num_epochs = 200
    config.learning_rate = 0.03
    config.lr_schedule = "cosine"
    config.weight_decay = 1e-4

    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.knn_every_steps = 0
    config.eval_batch_size = 1024
    return config

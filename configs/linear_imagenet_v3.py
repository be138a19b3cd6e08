"""Linear evaluation of a MoCo v3 encoder on ImageNet: the protocol of
facebookresearch/moco-v3 `main_lincls.py` (batch 1024, SGD momentum 0.9, no
weight decay, 90 epochs, cosine learning-rate decay; lr 0.1 per 256 images
for a ResNet-50, 3 for a ViT as its CONFIG.md runs it (`-a vit_small
--lr=3`); RandomResizedCrop(224) + flip; Resize(256) + CenterCrop(224)); the
backbone frozen with BN in inference mode, the classifier N(0, 0.01).

  python -m moco_jax.linear_eval --config configs/linear_imagenet_v3.py --pretrained=/ckpt/v3_vit_small \
      --workdir /tmp/linear_v3 --config.dataset=image_folder --config.data_dir=/data/imagenet \
      --config.train_split=train --config.eval_split=val
  # a ResNet-50 pretrained with MoCo v3:
  python -m moco_jax.linear_eval --config configs/linear_imagenet_v3.py --pretrained=/ckpt/v3_r50 \
      --config.learning_rate=0.1 --workdir /tmp/linear_v3_r50 ...

Published (moco-v3 README): ViT-Small 73.2%, ViT-Base 76.7% (300 epochs),
ResNet-50 72.8% (300 epochs), 74.6% (1000 epochs).
"""

from configs import linear_imagenet


def get_config():
    config = linear_imagenet.get_config()
    config.batch_size = 1024
    config.num_epochs = 90
    config.learning_rate = 3.0  # per 256 images: ViT (0.1 for a ResNet-50)
    config.lr_schedule = "cosine"
    config.lr_drop_epochs = ()
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    return config

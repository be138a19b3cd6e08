"""Linear evaluation of a ResNet-50 on ImageNet-style data: the reference
protocol of facebookresearch/moco `main_lincls.py` (batch 256, lr 30, 100
epochs, lr x0.1 at 60 and 80, RandomResizedCrop(224) + flip, Resize(256) +
CenterCrop(224)).

  python -m moco_jax.linear_eval --config configs/linear_imagenet.py --pretrained=/ckpt/v2 --workdir /tmp/linear

Linear evaluation holds the labelled images in host memory, decoded once at
256 px (shorter side) and centre-cropped: the evaluation view is then exactly
Resize(256) + CenterCrop(224), while training crops come from that central
square. That suits Imagenette-sized data (e.g. the 500-photo sample:
--config.dataset=image_folder --config.data_dir=../shared/data/imagenette_sample
--config.eval_split=val), not the full ImageNet (about 250 GB at 256 px: cap
it with --config.max_train_images).
"""

from configs import linear_cifar10


def get_config():
    config = linear_cifar10.get_config()
    config.dataset = "imagenet2012"  # a tensorflow-datasets name (manual download), or image_folder
    config.eval_split = "validation"
    config.image_size = 256  # decode size: Resize(256)
    config.crop_size = 224
    config.batch_size = 256
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    return config

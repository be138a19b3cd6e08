"""Linear evaluation of a ResNet-50 on ImageNet-style data: the reference
protocol of facebookresearch/moco `main_lincls.py` (batch 256, lr 30, 100
epochs, lr x0.1 at 60 and 80, RandomResizedCrop(224) + flip, Resize(256) +
CenterCrop(224)).

`dataset` must name a labelled source that `moco_jax.data.load_array_dataset`
knows; linear evaluation reads the images into host memory (fine for
Imagenette-sized data, not for the full ImageNet, see README).
"""

from configs import linear_cifar10


def get_config():
    config = linear_cifar10.get_config()
    config.dataset = "imagenet2012"
    config.image_size = 0  # the source's own size
    config.crop_size = 224
    config.batch_size = 256
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    return config

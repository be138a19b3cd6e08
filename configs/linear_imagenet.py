"""Linear evaluation of a ResNet-50 on ImageNet: the reference protocol of
facebookresearch/moco `main_lincls.py` (batch 256, lr 30, 100 epochs, lr
x0.1 at 60 and 80, SGD momentum 0.9, no weight decay; RandomResizedCrop(224)
of the whole image + flip; Resize(256) + CenterCrop(224)).

One 8-GPU host (ImageNet as an image folder, or a TFDS data_dir):

  python -m moco_jax.linear_eval --config configs/linear_imagenet.py --pretrained=/ckpt/v2 --workdir /tmp/linear \
      --config.dataset=image_folder --config.data_dir=/data/imagenet --config.train_split=train --config.eval_split=val

Several hosts: the same command on every host, with --coordinator_address,
--num_processes and --process_id (or a cluster's own variables), as for
train.py; each process reads its share of the images. `--config.mode=features`
extracts the features once into <workdir>/features (10.5 GB for the
1.28M x 2048 train features) and trains the classifier on them. What it
needs and how long it takes: docs/evaluation_and_export.md.

Smaller data, e.g. the 500-photo sample: --config.dataset=image_folder
--config.data_dir=../shared/data/imagenette_sample --config.eval_split=val.
"""

from configs import linear_cifar10


def get_config():
    config = linear_cifar10.get_config()
    config.dataset = "imagenet2012"  # a tensorflow-datasets name (manual download), or image_folder
    config.eval_split = "validation"
    config.crop_size = 224
    config.batch_size = 256
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    return config

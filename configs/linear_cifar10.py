"""Linear evaluation on CIFAR-10-sized data (`python -m moco_jax.linear_eval`,
whose default config this is).

The reference protocol (facebookresearch/moco `main_lincls.py`) on the
digits default; for the real CIFAR-10 arrays (../shared/data/cifar10):

  python -m moco_jax.linear_eval --pretrained=/tmp/moco_cifar10 --config.dataset=cifar10_arrays \
      --workdir /tmp/linear
  # a quick check on CPU: features once, no augmentation
  python -m moco_jax.linear_eval --pretrained=/tmp/moco --config.mode=features
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # The encoder: a pretraining workdir or an exported encoder (see moco_jax.pretrained.load). Set it
    # with --pretrained; --config.pretrained is the old spelling, still accepted.
    config.pretrained = ""
    config.mode = "full"  # full: the reference protocol | features: fixed features, no augmentation

    # Data (see configs/default.py add_data_fields): digits | cifar10_arrays
    # (in memory), or image_folder / a tensorflow-datasets name (streamed,
    # each process its share: training images RandomResizedCrop(crop_size)
    # of the whole image, evaluation images Resize(crop_size / 0.875) +
    # CenterCrop(crop_size)).
    default.add_data_fields(config)
    # digits: upsampled from 8x8 to this (image_folder / tfds: unused);
    # 0 = the pretraining image_size when the encoder was pretrained on this
    # dataset, else the dataset's own (digits 16, cifar10_arrays 32).
    config.image_size = 0
    config.eval_split = "test"  # top-1/top-5 are measured here (ImageNet: 'validation')
    config.max_train_images = 0  # cap on the training images, a fixed random subset (0 = all)
    config.crop_size = 0  # 0 = the encoder's input size (its pretraining crop_size)
    config.train_crop_scale = (0.08, 1.0)  # RandomResizedCrop's default scale
    config.eval_crop_fraction = 0.875  # Resize(crop / 0.875) + CenterCrop(crop), i.e. 256 -> 224

    # Optimisation: SGD momentum 0.9, lr 30 (per 256 images), no weight
    # decay, 100 epochs, lr x0.1 at epochs 60 and 80.
    config.batch_size = 256  # global, over all devices
    config.num_epochs = 100
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.learning_rate = 30.0  # per 256 images; scaled by batch_size / 256
    config.lr_schedule = "step"
    config.lr_drop_epochs = (60, 80)
    config.warmup_epochs = 0.0
    config.weight_decay = 0.0
    config.weight_decay_mask = "all"
    config.sgd_momentum = 0.9

    # Intervals in steps or epochs (at most one of each pair > 0; 0 = only at the end).
    config.seed = 0
    config.log_every_steps = 50
    config.log_every_epochs = 0.0
    config.checkpoint_every_steps = 500  # full mode, with --workdir
    config.checkpoint_every_epochs = 0.0
    config.eval_batch_size = 256
    return config

"""The embedded default: MoCo v2 on scikit-learn's digits, on a 2-core CPU.

1,797 real 8x8 handwritten digits ship with scikit-learn, so this runs on a
fresh machine with no download: a ResNet-10 of width 16 with the CIFAR stem,
on the digits upsampled to 16x16, trained with the MoCo v2 recipe (MLP head,
T=0.2, cosine schedule) and the CIFAR demo's augmentation. On one device,
split BN (`bn_splits=8`) emulates the shuffle BN of 8 devices.

Run:
  python train.py                     # == --config configs/default.py
  python train.py --config.num_epochs=5 --config.model.width=8

Expected (2-core CPU, about 2.5 minutes): the weighted kNN accuracy (k=200,
T=0.1) on the 359 held-out digits rises from 81.9% (backbone) / 77.2%
(projection) for the randomly initialised encoder to about 91.6% / 91.9%.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    config.dataset = "digits"  # digits | cifar10_arrays (see moco_jax/data.py)
    config.data_dir = ""  # '' = the dataset's default location
    config.image_size = 16  # digits are upsampled from 8x8 to this size
    config.augmentation = "cifar"  # moco_v1 | moco_v2 | cifar (moco_jax/augment.py)
    config.crop_size = 16
    config.crop_scale = (0.5, 1.0)  # 8x8 digits lose their identity in smaller crops

    # Model.
    config.model = ml_collections.ConfigDict()
    config.model.depth = 10  # 10 | 18 | 34 | 50
    config.model.width = 16  # filters of the first stage (64 in the papers)
    config.model.stem = "cifar"  # imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv
    config.model.head = "mlp"  # linear (MoCo v1) | mlp (MoCo v2)
    config.model.dtype = "float32"  # float32 | bfloat16 (params and BN stats stay float32)
    config.model.sync_bn = False  # True: BN statistics over all devices (SyncBN)
    config.model.bn_momentum = 0.9  # Flax convention; = PyTorch momentum 0.1
    config.embed_dim = 128
    config.bn_splits = 8  # BN groups per device: emulates shuffle BN over that many devices

    # MoCo.
    config.queue_size = 256  # K; divisible by batch_size; small vs the 1,438 images, so few
    # negatives are other views of the query image itself
    config.temperature = 0.2
    config.momentum = 0.99  # key-encoder EMA
    config.shuffle_bn = True
    config.symmetric_loss = False

    # Optimisation.
    config.batch_size = 64  # global, over all devices
    config.num_epochs = 30
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.learning_rate = 0.06  # per 256 images; scaled by batch_size / 256
    config.lr_schedule = "cosine"  # cosine (MoCo v2) | step (MoCo v1)
    config.lr_drop_epochs = (120, 160)  # for lr_schedule=step
    config.warmup_epochs = 0.0
    config.weight_decay = 5e-4
    config.weight_decay_mask = "all"  # all (the reference) | no_bn_bias
    config.sgd_momentum = 0.9

    # Logging and evaluation.
    config.seed = 0
    config.log_every_steps = 20
    config.knn_k = 200
    config.knn_temperature = 0.1
    config.eval_batch_size = 256
    return config

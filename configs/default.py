"""The embedded default: MoCo v2 on scikit-learn's digits, on a 2-core CPU.

1,797 real 8x8 handwritten digits ship with scikit-learn, so this runs on a
fresh machine with no download: a ResNet-10 of width 16 with the CIFAR stem,
on the digits upsampled to 16x16, trained with the MoCo v2 recipe (MLP head,
T=0.2, cosine schedule) and the CIFAR demo's augmentation. Shuffle BN runs
over 8 BN groups on any device count that divides the batch: on one device
split BN (8 splits) emulates 8 devices (`bn_splits=0`, auto).

Run:
  python train.py                     # == --config configs/default.py
  python train.py --config.num_epochs=5 --config.model.width=8

Expected (2-core CPU, about a minute): the weighted kNN accuracy (k=200,
T=0.1) on the 359 held-out digits rises from 81.9% (backbone) / 77.2%
(projection) for the randomly initialised encoder to about 90% / 90%:
90.0% / 89.7%, 90.3% / 90.8% and 89.7% / 90.0% on three 2-core VMs with the
same code (float rounding differs between their CPUs).
"""

import ml_collections


def add_data_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The fields that say where the images are and how to read them
    (moco_jax/data/: `open_source`, `SourceConfig`). Pretraining and the linear
    probe (configs/linear_cifar10.py) both declare them through this function."""
    # dataset: digits | cifar10_arrays (in memory) |
    #   image_folder (data_dir/<split>/<class>/*.jpg|png) | any tensorflow-datasets
    #   name, e.g. cifar10, stl10, imagenette/320px-v2, imagenet2012 (optionally
    #   written tfds:NAME). See moco_jax/data/__init__.py. CIFAR-10 from the real arrays:
    #   --config.dataset=cifar10_arrays --config.data_dir=/path/to/shared/data/cifar10
    config.dataset = "digits"
    # digits: unused; cifar10_arrays: the mosaics' folder ('' = $MOCO_JAX_CIFAR10_DIR,
    # else ../shared/data/cifar10); image_folder: the root; tfds: the TFDS data
    # directory ('' = TFDS's default).
    config.data_dir = ""
    # In-memory datasets: the side images are loaded at (digits are upsampled from
    # 8x8; cifar10_arrays is 32), 0 = the dataset's own size. Linear evaluation of
    # image folders / tfds: the side the labelled images are decoded to.
    config.image_size = 0
    config.train_split = "train"  # tfds split / image_folder sub-folder ('' = data_dir itself)
    config.eval_split = "test"  # labelled eval images (tfds split / sub-folder, e.g. 'val')
    config.skip_corrupt_images = False  # image_folder / tfds: True = log, count and skip undecodable images
    # Which pipeline decodes image folders and tfds datasets: grain (Pillow in worker
    # processes, no TensorFlow) or tf (tf.data). auto: grain, except tfds datasets
    # prepared as TFRecord files, which only tf.data reads. BENCHMARKS.md compares them.
    config.data_loader = "auto"
    # grain worker processes: -1 = the CPUs this process owns (its affinity, cgroup quota and
    # SLURM_CPUS_PER_TASK, shared among the host's training processes) but one, where that
    # makes >= 2, else none; 0 = none (decode threads in the training process). Fewer start
    # where /dev/shm cannot hold what they buffer (a warning says so and how to fix it).
    config.input_workers = -1
    # Decode threads: tf.data's (0 = the CPUs owned but one); grain's per worker (0 = 1, or
    # one per CPU owned without workers).
    config.input_threads = 0
    # grain: threads of each worker (or of the training process) that read the files of a
    # step ahead of their decoding, hiding a network filesystem's latency; 0 = read each
    # file when it is decoded.
    config.input_read_threads = 4
    # grain, pretraining: the host decodes each image into a slot of (2 x crop_size)^2 pixels
    # and the accelerator cuts and resizes both crops (half the host CPU per image, twice the
    # bytes of two crops sent to the device); False = the host resizes them (the same boxes,
    # pixels within 1). tf.data, and the linear probe's and evaluations' views: host.
    config.resize_on_device = True
    config.shuffle_buffer = 10_000  # tfds: examples in the shuffle buffer (after file shuffling)
    config.tfds_download = False  # tfds: download and prepare a missing dataset
    # image_folder: where the index of each split's files is kept (listed once per job by
    # process 0, read by the other processes, later launches and the evaluations while the
    # folder is unchanged). '' = data_dir/.moco_jax_index when data_dir is writable, else the
    # workdir's data_index folder; set it to a folder every process can write when neither is.
    config.index_dir = ""
    config.image_key = "image"  # tfds: the feature holding the image
    config.label_key = "label"  # tfds: the feature holding the class label
    return config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data (the fields shared with linear evaluation: see add_data_fields).
    add_data_fields(config)
    config.image_size = 16  # digits are upsampled from 8x8 to this size
    config.knn_train_split = ""  # kNN bank, '' = train_split (stl10: pretrain 'unlabelled', bank 'train')
    config.train_subset = 0  # in-memory datasets: pretrain on a fixed random subset of this size (0 = all)
    config.knn_max_train_images = 50_000  # cap on the kNN bank (0 = all)
    config.knn_center_crop_fraction = 1.0  # kNN view: resize to crop_size / this, centre crop (0.875: ImageNet)
    # moco_v1 | moco_v2 | cifar | moco_v3 | cifar_v3 (moco_jax/core/augment.py)
    config.augmentation = "cifar"
    config.crop_size = 16  # side of the square crops the encoder sees
    config.crop_scale = (0.5, 1.0)  # 8x8 digits lose their identity in smaller crops

    # Method: moco_v2 (v1/v2: queue, shuffle BN; methods/moco_v2.py) | moco_v3 (no
    # queue, symmetric loss against the global batch's keys, predictor; methods/moco_v3.py).
    config.method = "moco_v2"

    # Model.
    config.model = ml_collections.ConfigDict()
    config.model.arch = "resnet"  # resnet | vit
    config.model.depth = 10  # 10 | 18 | 34 | 50
    config.model.width = 16  # filters of the first stage (64 in the papers)
    config.model.stem = "cifar"  # imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv
    config.model.head = "mlp"  # linear (MoCo v1) | mlp (MoCo v2)
    config.model.dtype = "float32"  # float32 | bfloat16 (params and BN stats stay float32)
    config.model.sync_bn = False  # True: BN statistics over all devices (SyncBN)
    config.model.bn_momentum = 0.9  # Flax convention; = PyTorch momentum 0.1
    # none | blocks: recompute each ResNet / ViT block in the backward pass, keeping only
    # its input (about one more backbone forward per step; core/models.py REMAT); what it
    # saves: BENCHMARKS.md "Rematerialisation".
    config.model.remat = "none"
    config.model.zero_init_residual = False  # ResNet: each block's last BN scale starts at 0 (MoCo v3)
    # ResNet convolutions' init: torchvision (kaiming normal, fan-out; the official
    # code's) | pytorch (nn.Conv2d's default, ~2.4x smaller; core/models.py CONV_INITS).
    config.model.conv_init = "torchvision"
    config.model.vit = "small"  # arch=vit: test | mini | tiny | small | base (core/vit.py VIT_SIZES)
    config.model.patch_size = 16  # arch=vit
    config.model.stop_grad_patch = False  # arch=vit: freeze the random patch projection (MoCo v3)
    config.model.mlp_dim = 4096  # moco_v3: hidden width of the projector and predictor MLPs
    config.embed_dim = 128  # output width of the projection head (the contrastive space)
    # BN groups per device (split BN emulates shuffle BN over more devices);
    # 0 = auto: 8 groups in all (8 splits on 1 device, 4 on 2, 1 from 8 on).
    config.bn_splits = 0

    # MoCo.
    # (256 is small vs the 1,438 digits, so few negatives are other views of the query image itself.)
    config.queue_size = 256  # K, the negatives (0 for moco_v3); a multiple of batch_size
    config.temperature = 0.2  # T of the InfoNCE logits q.k / T
    config.momentum = 0.99  # key-encoder EMA
    config.momentum_schedule = "constant"  # constant | cosine (m -> 1 over training, MoCo v3)
    config.shuffle_bn = True  # moco_v2: the key encoder sees its batch shuffled across BN groups
    # auto: all_to_all where the per-device batch splits over the devices (n x less traffic), else all_gather
    # (the reference); see methods/shuffle_bn.py
    config.shuffle_mode = "auto"
    config.symmetric_loss = False  # moco_v2 only (moco_v3 is always symmetric)

    # Optimisation.
    config.optimizer = "sgd"  # sgd (v1/v2) | lars (v3 ResNet) | adamw (v3 ViT); core/optim.py
    config.batch_size = 64  # global, over all devices
    config.num_epochs = 30  # passes over the training images
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.learning_rate = 0.06  # per 256 images; scaled by batch_size / 256
    config.lr_schedule = "cosine"  # cosine (MoCo v2) | step (MoCo v1)
    config.lr_drop_epochs = (120, 160)  # for lr_schedule=step
    config.warmup_epochs = 0.0  # linear learning-rate warm-up from 0
    config.weight_decay = 5e-4  # coupled (PyTorch SGD), on every parameter by default
    config.weight_decay_mask = "all"  # all (the reference) | no_bn_bias
    # none (the reference) | pytorch_init: each conv kernel's gradient x 6 * in / out channels, which under
    # BN is exactly training from the init shrunk to PyTorch's default scale (issue 16; core/optim.py)
    config.conv_grad_scale = "none"
    config.sgd_momentum = 0.9  # also LARS's momentum
    config.lars_trust_coefficient = 0.001  # optimizer=lars: the trust ratio's coefficient

    # Logging and evaluation. Intervals are given in steps or in epochs
    # (X_every_steps / X_every_epochs, at most one of the two > 0; 0 = only at
    # the end); moco_jax.core.config.steps() turns them into steps.
    config.seed = 0  # initialisation, data order and augmentation
    config.log_every_steps = 20  # console, metrics.jsonl and TensorBoard
    config.log_every_epochs = 0.0  # (or in epochs)
    config.checkpoint_every_steps = 200  # with --workdir; also saved at the end
    config.checkpoint_every_epochs = 0.0  # (or in epochs)
    config.checkpoints_to_keep = 3  # the newest ones; older ones are deleted
    config.knn_every_steps = 0  # kNN monitor during training (0: only at the end)
    config.knn_every_epochs = 0.0  # (or in epochs)
    config.knn_k = 200  # neighbours of the weighted kNN
    config.knn_temperature = 0.1  # T of the neighbours' weights exp(sim / T)
    config.eval_batch_size = 256  # images per batch when embedding for the kNN
    # Online linear probe (solo-learn's): a classifier on the query view's backbone features, trained inside
    # each step on the source's labels with its own SGD; logs online_top1; changes nothing of the MoCo update.
    config.online_probe = False
    config.online_probe_lr = 0.1  # its SGD's constant learning rate (momentum 0.9, no weight decay)

    # Weights & Biases (optional, `pip install wandb`): the same scalars as
    # TensorBoard, from process 0. The run id is kept in the workdir
    # (W/wandb_run_id), so a resumed run continues the same W&B run.
    config.wandb_project = ""  # '' = off
    config.wandb_entity = ""  # '' = your default entity
    config.wandb_name = ""  # '' = W&B's generated run name
    return config

"""benchmarks/init_study.py: the study point's config and its printed curve
(the runs themselves are the study, in BENCHMARKS.md)."""

from benchmarks import init_study
from moco_jax.training.checks import validate_config


def test_study_config_is_the_shrunk_demo_recipe():
    args = init_study.parse_args(["--conv_init", "pytorch", "--epochs", "48", "--seed", "1", "--lr_scale", "2"])
    config = init_study.study_config(args)
    validate_config(config, num_devices=1)
    assert config.model.conv_init == "pytorch" and config.num_epochs == 48 and config.seed == 1
    assert (config.model.width, config.batch_size, config.train_subset) == (16, 128, 10_000)
    assert config.knn_max_train_images == 10_000 and config.dataset == "cifar10_arrays"
    assert config.learning_rate == 0.06  # 2 x the demo's 0.03 per 256
    assert config.knn_every_epochs == 4  # 48 / 12
    assert init_study.study_config(init_study.parse_args(["--epochs", "12"])).knn_every_epochs == 2
    full = init_study.study_config(init_study.parse_args(["--full", "--epochs", "200"]))
    validate_config(full, num_devices=1)
    assert (full.model.width, full.batch_size, full.train_subset) == (64, 512, 0)
    assert full.model.conv_init == "torchvision" and full.conv_grad_scale == "none"
    scaled = init_study.study_config(init_study.parse_args(["--conv_grad_scale", "pytorch_init"]))
    validate_config(scaled, num_devices=1)
    assert scaled.conv_grad_scale == "pytorch_init" and scaled.model.conv_init == "torchvision"


def test_curve_joins_the_monitor_records_with_the_final_knn():
    records = [
        {"step": 0, "weight_norm/backbone/conv1": 2.0, "weight_norm/head": 6.5},
        {"step": 10, "loss": 7.0, "epoch": 1.0},
        {"step": 20, "weight_norm/backbone/conv1": 2.5, "weight_norm/head": 6.75, "knn_backbone": 0.3,
         "knn_projection": 0.25},
        {"step": 40, "loss": 6.5, "epoch": 4.0},
        {"step": 40, "weight_norm/backbone/conv1": 3.0, "weight_norm/head": 7.0},
    ]
    final = {"step": 40, "knn_backbone": 0.4, "knn_projection": 0.35, "knn_random_backbone": 0.2,
             "knn_random_projection": 0.1, "loss": 6.5}
    rows = init_study.curve(records, final)
    assert [row["epoch"] for row in rows] == [0, 2, 4]
    assert [(row["knn_backbone"], row["knn_projection"]) for row in rows] == [(0.2, 0.1), (0.3, 0.25), (0.4, 0.35)]
    assert [row["weight_norm/backbone/conv1"] for row in rows] == [2.0, 2.5, 3.0]
    table = init_study.format_curve(rows).splitlines()
    assert table[0] == "epoch | kNN backbone | kNN projection | backbone/conv1 | head"
    assert table[2:] == ["0 | 20.0 | 10.0 | 2.00 | 6.50", "2 | 30.0 | 25.0 | 2.50 | 6.75",
                         "4 | 40.0 | 35.0 | 3.00 | 7.00"]

"""The training-step benchmark runs (tiny mode, 8 CPU devices) and reports a
complete table, so the script cannot rot. Nothing is asserted on time."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train_step


def test_tiny_benchmark_reports_every_column(tmp_path, capsys):
    path = tmp_path / "table.json"
    rows = train_step.main(["--tiny", "--peak_tflops", "0.05", "--json", str(path)])

    assert [(r["model"], r["dtype"]) for r in rows] == [("tiny", "float32"), ("tiny", "bfloat16")]
    for row in rows:
        assert set(train_step.COLUMNS) <= set(row)
        assert row["devices"] == 8 and row["local_batch"] == 8 and row["global_batch"] == 64
        for column in ("pairs_per_s", "step_ms", "compile_s", "peak_mem_gib", "model_gflop_per_pair",
                       "xla_gflop_per_pair", "mfu", "final_loss"):
            assert isinstance(row[column], float) and math.isfinite(row[column]) and row[column] > 0, (column, row)
        assert row["peak_mem_source"] == "memory_analysis"  # the CPU has no memory_stats()
        assert row["recompiles"] == 0, "the real train step compiled again after the first step"
        # pairs/s and step time describe the same measurement.
        assert math.isclose(row["pairs_per_s"] * row["step_ms"] / 1000, row["global_batch"], rel_tol=1e-6)

    table = capsys.readouterr().out.strip().splitlines()[-4:]
    assert table[0] == "| " + " | ".join(train_step.COLUMNS) + " |"
    assert [line.split(" | ")[:2] for line in table[2:]] == [["| tiny", "float32"], ["| tiny", "bfloat16"]]
    assert all(line.count("|") == len(train_step.COLUMNS) + 1 for line in table)

    written = json.loads(path.read_text())
    assert written["rows"] == rows
    assert written["environment"]["local_devices"] == 8 and written["environment"]["jax"]


def test_peak_flops_table():
    assert train_step.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert train_step.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 494.7
    assert train_step.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert train_step.peak_tflops("cpu", "float32") is None


def test_model_flops_fall_back_to_the_compiled_count(monkeypatch):
    """jax 0.11 on GPU answers None to the cost analysis of a lowered (not yet
    compiled) computation: the model GFLOP then come from the compiled
    forward, and are None, not a crash, where no count exists at all."""
    config = train_step.experiment_config(train_step.MODELS["tiny"], "float32", 8, "all_gather", 1)
    lowered_count = train_step.model_gflop_per_pair(config)
    assert lowered_count > 0

    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
    compiled_count = train_step.model_gflop_per_pair(config)
    assert math.isfinite(compiled_count) and 0.5 * lowered_count < compiled_count < 2 * lowered_count

    monkeypatch.setattr(jax.stages.Compiled, "cost_analysis", lambda self: None)
    assert train_step.model_gflop_per_pair(config) is None


def test_checkpoint_io_benchmark_reports_every_column(tmp_path):
    from benchmarks import checkpoint_io  # noqa: PLC0415
    from tiny import tiny_config  # noqa: PLC0415

    result = checkpoint_io.measure(tiny_config(), str(tmp_path / "w"), repeats=1)
    assert set(result) == {"state_mb", "blocking_s", "committed_s", "read_back_check_s", "disk_mb"}
    assert result["committed_s"] >= result["blocking_s"] > 0 and result["read_back_check_s"] > 0
    assert 0 < result["disk_mb"] and result["state_mb"] > 0


def test_knn_memory_benchmark_shows_the_split_bank_smaller_per_device(monkeypatch, capsys):
    from benchmarks import knn_memory  # noqa: PLC0415

    monkeypatch.setattr("sys.argv", ["knn_memory", "--bank", "4000", "--queries", "300", "--dim", "64",
                                     "--classes", "10", "--k", "20"])
    knn_memory.main()
    one, split = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert one["layout"] == "one device" and split["layout"] == "bank over 8 devices, one query step, per device"
    assert split["argument_bytes"] < one["argument_bytes"] and split["total_bytes"] < one["total_bytes"]


def test_collective_bytes_counts_each_kind_from_the_hlo():
    step = jax.pmap(lambda x: (jax.lax.all_gather(x.astype(jnp.bfloat16), "i", tiled=True),
                               jax.lax.all_to_all(x, "i", 0, 0, tiled=True), jax.lax.psum((x, x[0]), "i")),
                    axis_name="i")
    counted = train_step.collective_bytes(step.lower(np.zeros((8, 16, 3), np.float32)).as_text("hlo"))
    assert counted == {"all-gather": 128 * 3 * 2, "all-to-all": 16 * 3 * 4, "all-reduce": (16 * 3 + 3) * 4}
    assert train_step.received_bytes(counted, 8) == (128 * 3 * 2 + 16 * 3 * 4) * 7 / 8


def test_exchange_rows_show_the_all_to_all_and_bfloat16_savings(capsys):
    """Bytes from the lowered step on 8 devices: the all-to-all shuffle moves
    less than the all-gather (whose images are most of what it moves), and
    bfloat16 images less than float32; the all-reduces (gradients) do not change."""
    rows = train_step.main(["--exchange", "--models", "tiny", "--shuffle_mode", "all_gather,all_to_all,auto"])
    mb = {(r["dtype"], r["shuffle_mode"]): r["recv_mb"] for r in rows}
    for dtype in ("float32", "bfloat16"):
        assert mb[dtype, "all_to_all"] < 0.5 * mb[dtype, "all_gather"]
        assert mb[dtype, "auto"] == mb[dtype, "all_to_all"]  # 8 images per device split over 8 devices
    assert mb["bfloat16", "all_gather"] < mb["float32", "all_gather"]
    assert len({r["all_reduce_mb"] for r in rows}) == 1
    assert "| tiny | bfloat16 | 8 | 8 | auto |" in capsys.readouterr().out

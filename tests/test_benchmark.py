"""The training-step benchmark runs (tiny mode, 8 CPU devices) and reports a
complete table, so the script cannot rot. Nothing is asserted on time."""

import json
import math

import jax

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

"""benchmarks/imagenet_host.py runs end to end on a tiny scale and reports
every row, so the script cannot rot; and what its memory rows show holds: a
grain worker receives the same few hundred bytes for a folder of 200 and of
2,000 files, where the path array grows tenfold. Nothing is asserted on
time."""
import math

import pytest

from benchmarks import imagenet_host

pytestmark = pytest.mark.slow


def test_every_row_reported(tmp_path):
    result = imagenet_host.main(["--photos", "64", "--small", "200", "--big", "2000", "--workers", "0,1",
                                 "--steps", "2", "--reps", "1", "--workdir", str(tmp_path)])
    decoders = [row["decoder"] for row in result["cpu"]]
    assert decoders == (["simplejpeg"] * 2 if result["environment"]["simplejpeg"] else []) + ["Pillow"] * 2
    for row in result["cpu"]:
        for key in ("cpu_ms_per_image", "resize_on_device_cpu_ms_per_image", "decode_ms", "crops_and_resizes_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert 0 <= row["boxes_resized_by_the_host"] < 0.5
        assert row["bytes_per_image"] == {"host_resize": 2 * 224 * 224 * 3, "resize_on_device": 448 * 448 * 3}
        assert set(row["decode_ms_at_reduction"]) == {"1/1", "1/2", "1/4", "1/8"}
        assert 80 < row["mean_kb"] < 140  # ImageNet-sized stand-ins
    device = result["device"]  # the resize moved to the accelerator: more FLOPs there, by XLA's count
    assert device["slots"]["gflops_per_pair"] > device["host_crops"]["gflops_per_pair"] > 0
    assert [(row["workers"], row["resize_on_device"]) for row in result["scaling"]] == [
        (0, False), (0, True), (1, False), (1, True)]
    assert all(row["images_per_s"] > 0 for row in result["scaling"])
    small, big = (r for r in result["memory"] if r["index"] == "from the index")
    assert (small["files"], big["files"]) == (200, 2000)
    assert len(big["worker_rss_mb"]) == 1  # the one worker of --workers 0,1
    assert abs(big["pickled_file_images_bytes"] - small["pickled_file_images_bytes"]) <= 16
    assert big["pickled_path_array_bytes"] > 8 * small["pickled_path_array_bytes"]
    assert {row["measure"] for row in result["listing"]} >= {"pathlib", "scandir", "write index", "read index"}

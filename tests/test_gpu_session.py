"""benchmarks/gpu_session.py, the prepared GPU lease, runs here at tiny sizes
(`--smoke`, the same code as on the GPU), so that it cannot crash on its first
GPU call: every phase's command, the JSON and the Markdown tables."""
import json
from pathlib import Path

import pytest

from benchmarks import gpu_session, official_moco

# What the official phase needs of facebookresearch/moco's builder.py: the
# real file where it was fetched (.official/moco, git-ignored), else this
# stand-in with the same interface (MoCo(base_encoder, dim, K, m, T, mlp),
# forward(im_q, im_k) -> (logits, labels)); what the test checks is the
# benchmark's harness, not the official code.
STAND_IN = '''
import torch, torch.nn as nn

class MoCo(nn.Module):
    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False):
        super().__init__()
        self.encoder_q, self.T = base_encoder(num_classes=dim), T
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, K), dim=0))

    def forward(self, im_q, im_k):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            k = nn.functional.normalize(self.encoder_q(im_k), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue], dim=1) / self.T
        return logits, torch.zeros(logits.shape[0], dtype=torch.long).cuda()
'''


def _official_dir(tmp_path: Path) -> Path:
    if (official_moco.OFFICIAL_DIR / "builder.py").is_file():
        return official_moco.OFFICIAL_DIR
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "builder.py").write_text(STAND_IN)
    return folder


@pytest.mark.slow
def test_every_phase_runs_at_tiny_sizes_and_the_tables_are_written(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0): the official phase "
                                        "needs it")
    if not (gpu_session.SHARED / "cifar10").is_dir():
        pytest.skip("../shared/data (CIFAR-10, the sample photos) is not here")
    out = tmp_path / "out"
    result = gpu_session.main(["--smoke", "--out", str(out), "--budget", "900",
                               "--official_dir", str(_official_dir(tmp_path))])
    status = {p["phase"]: p["status"] for p in result["phases"]}
    assert status == {"official": "ok", "v2": "ok", "v3": "ok", "v3_512": "ok", "host": "ok",
                      "v2_more": "skipped: its files are not here", "vits": "skipped: its files are not here",
                      "cifar": "ok"}, result["phases"]
    steps = {(r["phase"], r["model"], r["remat"]): r for r in result["steps"]}
    assert set(steps) == {("v2", "tiny", "none"), ("v3", "vit_test", "none"), ("v3_512", "vit_test", "blocks")}
    assert steps["v2", "tiny", "none"]["fits_local_batch"] > 8  # --fit's projection, in --memory_gib 1
    assert all(r["recompiles"] == 0 and r["pairs_per_s"] > 0 for r in result["steps"])
    [official] = result["official"]
    assert official["dtype"] == "bfloat16" and official["pairs_per_s"] > 0
    [ratio] = result["ratios"]
    assert ratio["ratio"] == steps["v2", "tiny", "none"]["pairs_per_s"] / official["pairs_per_s"]
    assert {r["workers"] for r in result["host"]["scaling"]} == {0, 1} and result["host"]["cpu"]
    assert (out / "cifar_workdir" / "metrics.jsonl").is_file()

    assert json.loads((out / "gpu_session.json").read_text()) == json.loads(json.dumps(result))
    table = (out / "gpu_session.md").read_text()
    for heading in ("## Phases", "## moco_jax training step", "## The official MoCo v2 code", "## Host input"):
        assert heading in table
    assert "| v3_512 | vit_test | bfloat16 | blocks |" in table


def test_phases_without_time_or_files_are_skipped_and_said(tmp_path):
    result = gpu_session.main(["--smoke", "--out", str(tmp_path / "out"), "--budget", "20",
                               "--official_dir", str(tmp_path / "nothing"), "--phases", "official,v2"])
    official, v2 = result["phases"]
    assert official["status"] == "skipped: its files are not here"
    assert v2["status"].startswith("skipped: ") and v2["status"].endswith(" s left")  # 20 s less the reserve
    assert result["steps"] == [] and result["official"] == [] and result["ratios"] == []
    assert "| v2 | skipped: " in (tmp_path / "out" / "gpu_session.md").read_text()

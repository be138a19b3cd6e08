"""Metric writers: TensorBoard event files through tensorboardX, written and
read back in a process where TensorFlow cannot be imported, and the optional
Weights & Biases run (a fake wandb module), resumed by its saved id."""
import errno
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from moco_jax.training import checks
from moco_jax.core.errors import ConfigError
from moco_jax.training import metrics
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
# Two launches on one workdir (the second a resume), then the event files read
# back by TensorBoard's own reader; float32-exact values, compared exactly.
WRITE_AND_READ_WITHOUT_TF = textwrap.dedent('''
    import sys
    sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError from here on
    import json
    from moco_jax.training import metrics

    workdir = sys.argv[1]
    for steps in ((1, 2, 3), (4, 5)):
        writer = metrics.MetricWriter(workdir)
        for step in steps:
            writer.write(step, {"loss": 2.0 ** -step, "top1": step / 8})
        writer.close()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu") and sys.modules[m])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(workdir)
    acc.Reload()
    print(json.dumps({"loaded": loaded, **{tag: [[e.step, e.value] for e in acc.Scalars(tag)]
                                           for tag in ("loss", "top1")}}))
''')


def test_event_files_are_written_and_resumed_without_tensorflow(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WRITE_AND_READ_WITHOUT_TF, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    read = json.loads(proc.stdout.strip().splitlines()[-1])
    assert read["loaded"] == []
    assert read["loss"] == [[s, 2.0 ** -s] for s in range(1, 6)]
    assert read["top1"] == [[s, s / 8] for s in range(1, 6)]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2  # one per launch
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path))] == [1, 2, 3, 4, 5]


class FakeWandb(types.ModuleType):
    """Records what the writer asks of wandb; `init` returns the module as the run."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: f"run{len(self.inits)}")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        self.logs.append((step, values))

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_wandb_run_is_resumed_by_its_saved_id(tmp_path, fake_wandb):
    config = tiny_config(wandb_project="moco", wandb_name="tiny")
    for step in (1, 2):  # two launches on one workdir
        writer = metrics.MetricWriter(str(tmp_path), config)
        writer.write(step, {"loss": float(step), "top1": step / 4})
        writer.close()
    assert (tmp_path / metrics.WANDB_ID_NAME).read_text().strip() == "run0"
    assert [(i["id"], i["resume"]) for i in fake_wandb.inits] == [("run0", "allow"), ("run0", "allow")]
    first = fake_wandb.inits[0]
    assert first["project"] == "moco" and first["name"] == "tiny" and first["entity"] is None
    assert first["dir"] == str(tmp_path) and first["config"]["model.width"] == 4
    assert fake_wandb.logs == [(1, {"loss": 1.0, "top1": 0.25}), (2, {"loss": 2.0, "top1": 0.5})]
    assert fake_wandb.finished == 2


def test_wandb_without_a_workdir_is_a_plain_run(fake_wandb):
    writer = metrics.MetricWriter(None, tiny_config(wandb_project="moco", wandb_entity="lab"))
    writer.write(3, {"loss": 0.5})
    writer.close()
    (init,) = fake_wandb.inits
    assert "id" not in init and "resume" not in init and init["dir"] is None and init["entity"] == "lab"
    assert fake_wandb.logs == [(3, {"loss": 0.5})]


def test_no_wandb_project_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would raise
    config = tiny_config()
    checks.validate_config(config, num_devices=8)
    writer = metrics.MetricWriter(str(tmp_path), config)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / metrics.WANDB_ID_NAME).exists() and (tmp_path / metrics.JSONL_NAME).exists()


def test_wandb_project_without_wandb_installed_is_refused_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    config = tiny_config(wandb_project="moco")
    with pytest.raises(ConfigError, match="pip install wandb"):
        checks.validate_config(config, num_devices=8)
    with pytest.raises(ConfigError, match="pip install wandb"):
        metrics.MetricWriter(str(tmp_path), config)


def test_weight_norms_group_the_kernels_of_each_stage():
    rng = np.random.default_rng(0)
    w = {name: rng.normal(size=shape) for name, shape in
         (("stem", (3, 3, 3, 4)), ("a", (3, 3, 4, 4)), ("b", (3, 3, 4, 4)), ("fc", (4, 2)))}
    params = {
        "backbone": {"conv1": {"kernel": w["stem"]}, "bn1": {"scale": np.ones(4), "bias": np.ones(4)},
                     "layer1_0": {"conv1": {"kernel": w["a"]}, "bn1": {"scale": np.full(4, 9.0)}},
                     "layer1_1": {"conv1": {"kernel": w["b"]}}},
        "head": {"fc": {"kernel": w["fc"], "bias": np.full(2, 5.0)}},
    }
    norms = metrics.weight_norms(params)
    assert norms == pytest.approx({
        "weight_norm/backbone/conv1": np.linalg.norm(w["stem"]),
        "weight_norm/backbone/layer1": np.sqrt(np.sum(w["a"] ** 2) + np.sum(w["b"] ** 2)),
        "weight_norm/head": np.linalg.norm(w["fc"]),
    }, rel=1e-12)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def _record(step: int) -> str:
    return json.dumps({"step": step, "loss": 1.0 / step}) + "\n"


def test_write_final_leaves_the_old_file_or_the_new_one_never_a_partial_one(tmp_path, monkeypatch):
    path = tmp_path / metrics.FINAL_NAME
    metrics.write_final(str(tmp_path), {"step": 1, "loss": 2.0})

    def dump_until_the_disk_is_full(obj, f, **kwargs):
        f.write('{"loss": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(json, "dump", dump_until_the_disk_is_full)
        with pytest.raises(OSError, match="No space"):
            metrics.write_final(str(tmp_path), {"step": 2, "loss": 1.0})
    assert json.loads(path.read_text()) == {"step": 1, "loss": 2.0}
    assert [p.name for p in tmp_path.iterdir()] == [metrics.FINAL_NAME], "no temporary file left behind"
    metrics.write_final(str(tmp_path), {"step": 2, "loss": 1.0})
    assert json.loads(path.read_text()) == {"step": 2, "loss": 1.0}


def test_read_jsonl_skips_a_torn_last_line_with_one_warning(tmp_path, caplog):
    path = tmp_path / metrics.JSONL_NAME
    path.write_text(_record(1) + _record(2) + '{"step": 3, "lo')
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path))] == [1, 2]
    (warning,) = _warnings(caplog)
    assert str(path) in warning and "torn last line 3" in warning


def test_read_jsonl_skips_a_torn_line_followed_by_later_appends(tmp_path, caplog):
    path = tmp_path / metrics.JSONL_NAME
    path.write_text(_record(1) + _record(2) + '{"step": 3, "lo' + _record(3) + _record(4))  # glued by an old writer
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path))] == [1, 2, 4]
    (warning,) = _warnings(caplog)
    assert str(path) in warning and "line 3" in warning


def test_read_jsonl_refuses_a_file_that_is_no_metrics_log(tmp_path):
    (tmp_path / metrics.JSONL_NAME).write_text("step,loss\n1,2.0\n")
    with pytest.raises(ValueError, match="no line of .* is JSON"):
        metrics.read_jsonl(str(tmp_path))


@pytest.mark.parametrize("tail, kept, warned", [
    ('{"step": 3, "lo', [1, 2, 4], True),  # killed mid-write: the torn record is cut off
    (_record(3).strip(), [1, 2, 3, 4], False),  # killed just before the newline: the record is kept
])
def test_writer_ends_a_torn_log_before_appending(tmp_path, caplog, tail, kept, warned):
    path = tmp_path / metrics.JSONL_NAME
    path.write_text(_record(1) + _record(2) + tail)
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(4, {"loss": 0.25})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == kept
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path))] == kept
    torn = [w for w in _warnings(caplog) if str(path) in w]
    assert len(torn) == warned and all("dropped its torn last line" in w for w in torn), torn

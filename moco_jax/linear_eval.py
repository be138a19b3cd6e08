"""Linear classification on frozen MoCo features (the standard protocol).

  python -m moco_jax.linear_eval --pretrained=/tmp/moco --workdir /tmp/moco_linear
  python -m moco_jax.linear_eval --pretrained=/tmp/moco --config.mode=features          # quick CPU check
  python -m moco_jax.linear_eval --pretrained=enc.msgpack --config configs/linear_imagenet.py \
      --config.dataset=image_folder --config.data_dir=/data/imagenette --workdir /tmp/linear

On several processes (a cluster, or processes started by hand with
--coordinator_address / --num_processes / --process_id, as for train.py)
the probe joins one JAX job exactly as train.py does: every process reads
its share of the images and the steps run on all devices of all processes.

`--pretrained` takes anything `moco_jax.pretrained.load` reads, as in every
other program: a pretraining workdir, a .msgpack or .safetensors export, an
official MoCo .pth.tar. `--config.pretrained` is its old spelling, still
accepted (the two may not name different encoders). `--config` defaults to
configs/linear_cifar10.py; the protocol and both modes are described in
`moco_jax.eval.linear`.

The training scalars of every log step go where pretraining's go
(`moco_jax.training.metrics.MetricWriter`): the console line `step N:
loss=..., top1=..., epoch=...`, and with `--workdir` its metrics.jsonl and
TensorBoard files. With `--workdir` the end result (test top-1 / top-5, the
step, the encoder, mode, dataset and config) is written to
final_metrics.json; a relaunch of a finished probe (the same config, its
checkpoint at that step) retrains and re-evaluates nothing: it says so and
prints the stored result. SIGTERM or SIGINT saves the step and exits (0
after SIGTERM); relaunching the same command resumes.
"""

from __future__ import annotations

import json
import os
import sys

from moco_jax.training import preemption

preemption.exit_on_signal()  # from the first line on: SIGTERM / SIGINT end the start-up in one line

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from moco_jax import pretrained  # noqa: E402
from moco_jax.eval import linear  # noqa: E402
from moco_jax.io import workdirs  # noqa: E402
from moco_jax.launch import cli, compilation_cache, distributed  # noqa: E402
from moco_jax.training import metrics, probe  # noqa: E402

# The repository's linear-probe config: the default --config (absent from an
# installed package, where --config must be given).
DEFAULT_CONFIG = os.path.join(cli.REPO_ROOT, "configs", "linear_cifar10.py")
OLD_SPELLING = "--config.pretrained"


def same_path(a: str, b: str) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def with_pretrained(config, flag: str | None) -> ml_collections.ConfigDict:
    """`config`, checked, with `pretrained` set from --pretrained, or from
    its old spelling --config.pretrained; both naming different encoders, or
    neither, is a usage error (reported after the config's own errors)."""
    if config is None:
        raise app.UsageError(f"--config is required: there is no {DEFAULT_CONFIG} to default to (give a linear "
                             "evaluation config, e.g. configs/linear_cifar10.py of the repository)")
    linear.validate_linear_config(config, jax.device_count())
    given = config.pretrained
    if flag and given and not same_path(flag, given):
        raise app.UsageError(f"--pretrained={flag} and {OLD_SPELLING}={given} name different encoders: give "
                             f"--pretrained only ({OLD_SPELLING} is its old spelling)")
    source = flag or given
    if not source:
        raise app.UsageError(f"--pretrained is required: {pretrained.FLAG_HELP} ({OLD_SPELLING}, its old spelling, "
                             "also works; see --helpshort)")
    config = config.copy_and_resolve_references()
    # Stored with the classifier's checkpoints and results: absolute, so it names the same encoder from anywhere.
    config.pretrained = os.path.abspath(source) if os.path.exists(source) else source
    return config


def newest_checkpoint_step(workdir: str) -> int | None:
    """The step of the newest checkpoint folder in `workdir`, or None."""
    try:
        names = os.listdir(workdirs.checkpoint_dir(workdir))
    except OSError:
        return None
    steps = [int(name) for name in names if name.isdigit()]
    return max(steps) if steps else None


def stored_result(config, workdir: str | None) -> dict | None:
    """The final_metrics.json of a finished full-mode probe in `workdir` with
    this very config and its checkpoint at the recorded step; else None (the
    probe then runs: resumes, or only evaluates if it is at its last step)."""
    if not workdir:
        return None
    final = metrics.read_final(workdir)  # None if absent (it is written again at the end)
    if final is None or final.get("config") != json.loads(config.to_json()):
        return None
    if final.get("step") is None or newest_checkpoint_step(workdir) != final["step"]:
        return None
    return final


def final_record(config, result) -> dict:
    """What final_metrics.json holds."""
    return {"top1": result["top1"], "top5": result["top5"], "step": int(result["step"]),
            "pretrained": config.pretrained, "mode": config.mode, "dataset": config.dataset,
            "config": json.loads(config.to_json())}


def result_line(final) -> str:
    return (f"linear eval ({final['mode']}) of {final['pretrained']} on {final['dataset']}: "
            f"top-1 {final['top1']:.2%}  top-5 {final['top5']:.2%}")


def _say(line: str, error: bool = False) -> None:
    """One line, from process 0 only."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr if error else sys.stdout, flush=True)


def _stopped(result: dict, workdir: str | None) -> int:
    """A signal stopped the probe after its step was saved (or, without a
    workdir, not): one line and the exit status (0 after a SIGTERM with the
    step saved: relaunch the same command)."""
    name, step = preemption.signal_name(result["signal"]), result["preempted"]
    if not workdir:
        _say(f"stopped by {name} after step {step}; nothing was saved (no --workdir)", error=True)
    elif result["phase"] == "final evaluation":
        _say(f"stopped by {name} during the final evaluation: checkpoint {step} is saved in {workdir}; relaunch "
             "the same command to evaluate it")
    else:
        _say(f"stopped by {name} after step {step}: checkpoint {step} is saved in {workdir}; relaunch the same "
             "command to resume")
    return preemption.exit_status(result["signal"], saved=bool(workdir))


def main(argv):
    del argv  # cli.run refuses extra arguments
    f = flags.FLAGS
    _join()  # first, before anything touches a device: the multi-process job, if any
    compilation_cache.enable(flags.FLAGS.compilation_cache)  # before anything compiles
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process reports; the others only warn
    config = with_pretrained(f.config, f.pretrained)
    distributed.check_same_config(config)
    workdir = os.path.abspath(f.workdir) if f.workdir else None
    stored = stored_result(config, workdir)
    if stored is not None:
        _say(f"already complete: the linear probe in {workdir} reached its last step {stored['step']}; nothing "
             f"retrained or re-evaluated, its stored result ({os.path.join(workdir, metrics.FINAL_NAME)}):")
        _say(result_line(stored))
        return
    try:
        result = probe.evaluate(config, workdir, fresh_start=f.fresh_start, take_over=f.take_over,
                                show_progress=jax.process_index() == 0)
    except preemption.Interrupted as e:
        _say(f"stopped by {preemption.signal_name(e.signum)} during {e.phase}: nothing was trained"
             + (f"; relaunch the same command to resume from {workdir}" if workdir else ""), error=not workdir)
        return preemption.exit_status(e.signum, saved=bool(workdir))
    if result["preempted"]:
        return _stopped(result, workdir)
    final = final_record(config, result)
    metrics.write_final(workdir, final)
    _say(result_line(final))


if __name__ == "__main__":
    cli.define_config_file("config", DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None,
                           "Linear evaluation config (default: the repository's configs/linear_cifar10.py).")
    flags.DEFINE_string("pretrained", None, f"{pretrained.FLAG_HELP} Formerly {OLD_SPELLING}, which still works.")
    flags.DEFINE_string("workdir", None, "Where the probe writes metrics.jsonl, TensorBoard files, "
                        "final_metrics.json and (full mode) its checkpoints; a relaunch resumes, and one of a "
                        "finished probe prints its stored result.")
    flags.DEFINE_bool("fresh_start", False, "Start over in a workdir whose checkpoints are all unusable "
                      "(without it such a relaunch refuses).")
    flags.DEFINE_bool("take_over", False, "Take the workdir from a probe that still holds its lock (that probe stops "
                      "without saving); a lock left by a dead one is taken over without this flag.")
    compilation_cache.define_flag()
    _join = distributed.define_process_flags()
    cli.run(main)

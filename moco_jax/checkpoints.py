"""What the checkpoints of a workdir hold, and bringing back those set aside
by a false alarm.

  python -m moco_jax.checkpoints --workdir W               # every checkpoint and its verdict
  python -m moco_jax.checkpoints --workdir W --bring_back  # return set-aside ones that verify now

A relaunch sets a checkpoint aside (`W/checkpoints/<step>.corrupt`) only when
its own bytes fail verification against the checksums it was saved with. If
that was a false alarm (storage that was briefly unreadable, or a verdict of
moco_jax 0.2, which misread MoCo v3 checkpoints in a new process),
`--bring_back` verifies every set-aside checkpoint again and moves those that
pass back to `<step>`, where the next relaunch resumes from them. It reads
and renames only, and holds the workdir's lock while it does (so not while a
run trains there).
"""

from __future__ import annotations

from absl import flags

from moco_jax.io import integrity, workdirs
from moco_jax.io import lock as workdir_lock
from moco_jax.launch import cli


def main(argv):
    del argv  # cli.run refuses extra arguments
    workdir = flags.FLAGS.workdir
    if flags.FLAGS.bring_back:
        with workdir_lock.holding(workdir):
            done = integrity.bring_back(workdir)
        for name, what in done:
            print(f"{name}: {what}")
        if not done:
            print(f"nothing is set aside in {workdirs.checkpoint_dir(workdir)}")
        return
    for name, verdict in integrity.inspect(workdir):
        print(f"{name}: {verdict}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The workdir of a train.py (or linear probe) run.")
    flags.DEFINE_bool("bring_back", False, "Move set-aside checkpoints that verify now back to their step folders.")
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)

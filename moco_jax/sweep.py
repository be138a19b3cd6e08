"""Run the points of a config's `get_sweep()`, each as its own training process.

  python -m moco_jax.sweep --config configs/sweep_example.py --workdir /tmp/sweep            # run all points
  python -m moco_jax.sweep --config configs/sweep_example.py --workdir /tmp/sweep --dry_run  # print the commands

See `moco_jax.launch.sweep` for the point names, the result tables and reruns.
The config file and every point are checked before the first point runs; a
point that fails in training is reported in the table and the sweep goes on.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from moco_jax.launch import cli, sweep


def main(argv):
    del argv  # cli.run refuses extra arguments
    f = flags.FLAGS
    if f.dry_run:
        for command in sweep.dry_run_commands(f.config, f.workdir):
            print(command)
        return 0
    results = sweep.run_sweep(f.config, f.workdir)
    print((Path(f.workdir) / "sweep_results.md").read_text(), end="")
    return 1 if any(r.status != "ok" for r in results) else 0


if __name__ == "__main__":
    flags.DEFINE_string("config", None, "Config file defining get_config() and get_sweep().", required=True)
    flags.DEFINE_string("workdir", None, "Sweep directory; one sub-workdir per point.", required=True)
    flags.DEFINE_bool("dry_run", False, "Print the training command of every unfinished point; run nothing.")
    cli.run(main)

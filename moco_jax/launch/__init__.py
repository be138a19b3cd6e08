"""Starting runs: joining the processes of a multi-host run (`distributed`)
and running sweeps of a config's points as separate processes (`sweep`)."""

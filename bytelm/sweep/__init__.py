"""The sweep runner: `bytelm sweep SPEC.yaml` runs a study, a grid of configurations, as
MLflow runs (docs/sweeps.md).

    spec.py      the spec file, read into typed blocks (grid, match, eval, bench, resources, slurm)
    plan.py      each configuration as a run: overrides, resources, byte or FLOP matching
    stages.py    the commands of each stage (train, synth, eval, bench), torchrun for several GPUs
    state.py     the markers that say which stages are done, tied to checkpoint steps
    job.py       one stage as a process: runs its commands, writes its marker (every launcher runs this)
    launcher.py  the launcher interface;  local.py: this host;  slurm.py: Slurm jobs
    progress.py  what a running sweep prints: each run's progress and the sweep's ETA
    runner.py    one sweep folder: plan.json, the MLflow parent run, job files, summary.json
    cli.py       the command line
"""

"""The user-facing lab: config, workload, runner, metrics, report and the `dualpath` CLI."""

"""Running a command end to end: preflight, loading for a run, the pipeline, run execution (local, Ray,
shards, merge), provenance, interrupts, the dry-run estimator, and the map / prune-eval / attribute runs."""

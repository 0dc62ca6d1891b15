"""Job launchers: ``dinov2-submit`` (SLURM through submitit, with checkpoint-and-requeue)."""

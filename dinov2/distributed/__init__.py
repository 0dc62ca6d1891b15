"""Process-group set-up, sharding (FSDP2) and the collective helpers used by the losses."""

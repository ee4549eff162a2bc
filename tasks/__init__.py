"""Thin Prefect tasks, one module per stage: cache policy, retries, tags, artifacts around ppd_core."""

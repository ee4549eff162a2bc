"""Prefect task: reward models as users (pairs relabelled by each reward), with a table of the reward users."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, run_stage_body


@task(name="relabel", tags=["ppd", "data"], **TASK_OPTIONS)
def relabel_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(config, stage, fingerprint, upstream_dirs)
    c = result["counts"]
    rows = [{"reward": name, **info, "skipped": ""} for name, info in c.get("reward_users", {}).items()]
    rows += [{"reward": name, "skipped": reason} for name, reason in c.get("rewards_skipped", {}).items()]
    create_table_artifact(
        rows, key="ppd-relabel-reward-users", description=f"Reward users, {result['directory']}"
    )
    return result

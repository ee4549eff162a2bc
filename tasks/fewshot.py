"""Prefect task: few-shot sets, seen/unseen split and held-out pairs."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, run_stage_body


@task(name="fewshot", tags=["ppd", "data"], **TASK_OPTIONS)
def fewshot_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(config, stage, fingerprint, upstream_dirs)
    c = result["counts"]
    keys = ("pairs_in", "users_seen", "users_unseen", "shot_sets", "train_pairs", "eval_pairs")
    create_table_artifact(
        [{"count": k, "value": str(c.get(k))} for k in keys],
        key="ppd-fewshot-summary",
        description=f"Few-shot sampling, {result['directory']}",
    )
    return result

"""Prefect task: few-shot sets, seen/unseen split and held-out pairs."""

from __future__ import annotations

from prefect import task

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, counts_artifact, run_stage_body


@task(name="fewshot", tags=["ppd", "data"], **TASK_OPTIONS)
def fewshot_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(config, stage, fingerprint, upstream_dirs)
    keys = ("pairs_in", "users_seen", "users_unseen", "shot_sets", "train_pairs", "eval_pairs")
    counts_artifact(result, keys, "ppd-fewshot-summary", "Few-shot sampling")
    return result

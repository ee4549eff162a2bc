"""Prefect task: build the tiny offline default models once per run root."""

from __future__ import annotations

from prefect import task

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, run_stage_body


@task(name="tiny_models", tags=["ppd", "models"], **TASK_OPTIONS)
def tiny_models_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    return run_stage_body(config, stage, fingerprint, upstream_dirs)

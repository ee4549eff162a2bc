"""Prefect task: the user-identification probe, published as a table artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, run_stage_body


@task(name="probe", tags=["ppd", "embed"], **TASK_OPTIONS)
def probe_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(config, stage, fingerprint, upstream_dirs)
    rows = [{"embedder": name, **scores} for name, scores in result["counts"].get("summary", {}).items()]
    create_table_artifact(
        rows, key="ppd-probe", description="User identification and archetype accuracy per embedder"
    )
    return result

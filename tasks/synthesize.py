"""Prefect task: the synthetic preference world (toy runs only)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, run_stage_body


@task(name="synthesize", tags=["ppd", "data"], **TASK_OPTIONS)
def synthesize_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(config, stage, fingerprint, upstream_dirs)
    c = result["counts"]
    create_markdown_artifact(
        f"**Synthetic world** `{result['directory']}`: {c.get('rows')} rows, {c.get('users')} users, "
        f"{c.get('images')} images in {c.get('files')} Pick-a-Pic v2 Parquet files.",
        key="ppd-synthesize",
    )
    return result

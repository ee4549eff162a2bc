"""Prefect task: Pick-a-Pic v2 ingestion, with a progress artifact and the quarantine summary."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, progress_reporter, run_stage_body


@task(name="ingest", tags=["ppd", "data"], **TASK_OPTIONS)
def ingest_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(
        config, stage, fingerprint, upstream_dirs, progress=progress_reporter("ingest rows")
    )
    c = result["counts"]
    rows = [{"outcome": "kept", "rows": c.get("kept_rows", 0)}]
    rows += [
        {"outcome": f"quarantined: {k}", "rows": v}
        for k, v in sorted(c.get("quarantine_by_reason", {}).items())
    ]
    rows.append({"outcome": "input", "rows": c.get("input_rows", 0)})
    create_table_artifact(
        rows, key="ppd-ingest-accounting", description=f"Ingestion accounting, {result['directory']}"
    )
    return result

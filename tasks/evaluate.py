"""Prefect task: the evaluate stage, publishing its win rates, targets and report link as artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, progress_reporter, run_stage_body


@task(name="evaluate", tags=["ppd", "evaluate"], **TASK_OPTIONS)
def evaluate_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(
        config, stage, fingerprint, upstream_dirs, progress=progress_reporter("evaluate steps")
    )
    out = Path(result["directory"])
    summary = json.loads((out / "summary.json").read_text())
    rows = [{"comparison": k, **v} for k, v in summary["headline"].items()]
    if rows:
        create_table_artifact(rows, key="ppd-win-rates", description=f"judge: {summary['primary_judge']}")
    targets = "\n".join(
        f"| {t['target']} | {t['value'] if t['value'] is None else round(t['value'], 3)} | "
        f"{'yes' if t['met'] else 'no'} |"
        for t in summary["targets"]
    )
    create_markdown_artifact(
        f"**Evaluation** `{out}`\n\n| target | value | met |\n|---|---|---|\n{targets}\n",
        key="ppd-evaluate",
    )
    create_link_artifact((out / "report.html").as_uri(), link_text="PPD report", key="ppd-report")
    return result

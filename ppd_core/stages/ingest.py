"""The `ingest` stage: Pick-a-Pic v2 Parquet (the source, or the synthetic world) -> validated pairs by
creation day, an image store and a quarantine with reasons."""

from __future__ import annotations

from pathlib import Path

from ppd_core.config import PPDConfig
from ppd_core.data.ingest import VERSION
from ppd_core.stage import Stage, StageContext, Summary
from ppd_core.stages.common import world


def resolve(cfg: PPDConfig) -> tuple[dict, dict]:
    """An external source is listed once, at planning: its files feed the body and their identity (path,
    size, version token) joins the fingerprint, so new or changed files re-ingest."""
    if not cfg.ingest.source:
        return {}, {}
    from ppd_core.data.pickapic import resolve_source, source_identity

    files = resolve_source(cfg.ingest.source)
    return {"files": files}, {"source": source_identity(files)}


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.data.ingest import ingest
    from ppd_core.data.pickapic import resolve_source
    from ppd_core.data.synthetic import DATA_DIR

    files = (
        ctx.inputs["files"]
        if ctx.cfg.ingest.source
        else resolve_source(str(ctx.dirs["synthesize"] / DATA_DIR))
    )
    return ingest(ctx.cfg.ingest, files, out, progress=ctx.progress)


def summarize(c: dict, directory: Path) -> list[Summary]:
    rows = [{"outcome": "kept", "rows": c.get("kept_rows", 0)}]
    rows += [
        {"outcome": f"quarantined: {k}", "rows": v}
        for k, v in sorted(c.get("quarantine_by_reason", {}).items())
    ]
    rows.append({"outcome": "input", "rows": c.get("input_rows", 0)})
    return [Summary("ppd-ingest-accounting", f"Ingestion accounting, {directory}", rows=rows)]


STAGE = Stage(
    "ingest",
    VERSION,
    world,
    lambda cfg: cfg.ingest,
    run,
    progress="ingest rows",
    summarize=summarize,
    tags=("data",),
    resolve=resolve,
)

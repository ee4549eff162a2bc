"""The `ingest` stage: Pick-a-Pic v2 Parquet (the source, or the synthetic world) -> validated pairs by
creation day, an image store and a quarantine with reasons.

With ``ingest.partitioned`` the days are ingested before this stage is planned, one committed
directory per day (:mod:`ppd_core.data.partitions`: the backfill's partitions, locks and status),
and this stage's output is their union: ``partitions.json`` naming each complete day of the window
by its manifest digest (:mod:`ppd_core.data.union`). Those digests join the fingerprint, so the
stage and everything downstream are recomputed exactly when the set of days (or one day) changes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ppd_core.config import PPDConfig, stable_fields
from ppd_core.data.ingest import VERSION
from ppd_core.stage import Stage, StageContext, Summary
from ppd_core.stages.common import world


def section(cfg: PPDConfig) -> dict:
    """Plain: the ingest settings. Partitioned: only the mode; each day's fingerprint covers the settings
    and its files, and the union's fingerprint covers the days' digests (``resolve``)."""
    from ppd_core.data.partitions import WINDOW_KEYS

    if cfg.ingest.partitioned:
        return {"partitioned": True}
    return {k: v for k, v in stable_fields(cfg.ingest).items() if k not in WINDOW_KEYS}


def resolve(cfg: PPDConfig, dirs: Mapping[str, Path]) -> tuple[dict, dict]:
    """Plain: an external source is listed once, at planning: its files feed the body and their identity
    (path, size, version token) joins the fingerprint, so new or changed files re-ingest.

    Partitioned: the window's days, each of which must be complete (the drivers ingest them first); the
    body gets their entries and the fingerprint their manifest digests."""
    if cfg.ingest.partitioned:
        from ppd_core.data import partitions

        source = partitions.source_of(cfg, dirs)
        plans = partitions.plan_partitions(cfg, *partitions.window(cfg), source=source)
        entries = partitions.union_entries(cfg.run.root, plans)
        return {"partitions": entries, "source": source}, {
            "partitions": {e["day"]: e["digest"] for e in entries}
        }
    if not cfg.ingest.source:
        return {}, {}
    from ppd_core.data.pickapic import resolve_source, source_identity

    files = resolve_source(cfg.ingest.source)
    return {"files": files}, {"source": source_identity(files)}


def run(ctx: StageContext, out: Path) -> dict:
    if ctx.cfg.ingest.partitioned:
        from ppd_core.data.partitions import write_partition_union

        return write_partition_union(ctx.cfg.run.root, ctx.inputs["partitions"], out, ctx.inputs["source"])
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
    section,
    run,
    progress="ingest rows",
    summarize=summarize,
    tags=("data",),
    resolve=resolve,
    brief=lambda c: (
        (f"{c['days']} days: " if "days" in c else "")
        + f"{c['kept_rows']:,} of {c['input_rows']:,} rows kept, {c['quarantined']:,} quarantined with a reason"
    ),
)

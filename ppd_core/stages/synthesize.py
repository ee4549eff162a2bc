"""The `synthesize` stage: the embedded synthetic preference world, written in the Pick-a-Pic v2 schema."""

from __future__ import annotations

from pathlib import Path

from ppd_core.stage import Stage, StageContext, Summary, no_upstream


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.data.synthetic import synthesize

    return synthesize(ctx.cfg.world, out, progress=ctx.progress)


def summarize(c: dict, directory: Path) -> list[Summary]:
    return [
        Summary(
            "ppd-synthesize",
            markdown=f"**Synthetic world** `{directory}`: {c.get('rows')} rows, {c.get('users')} users, "
            f"{c.get('images')} images in {c.get('files')} Pick-a-Pic v2 Parquet files.",
        )
    ]


STAGE = Stage(
    "synthesize",
    "2",
    no_upstream,
    lambda cfg: cfg.world,
    run,
    progress="rendered images",
    summarize=summarize,
    tags=("data",),
    brief=lambda c: f"{c['rows']:,} rows of {c['users']} users",
)

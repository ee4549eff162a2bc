"""The `probe` stage: what each embedder's 4-shot embeddings tell about a user (identification, archetype
and held-out pair accuracy probes)."""

from __future__ import annotations

from pathlib import Path

from ppd_core.config import PPDConfig
from ppd_core.data.world_render import world_dir
from ppd_core.stage import Stage, StageContext, Summary
from ppd_core.stages.common import world


def upstream(cfg: PPDConfig) -> tuple[str, ...]:
    from ppd_core.embed.extract import needs_encoder

    return ("embed", "fewshot", *(("encoder",) if needs_encoder(cfg.embed) else ()), *world(cfg))


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.embed.probe_stage import probe_stage

    d = ctx.dirs
    return probe_stage(
        ctx.cfg.probe, d["embed"], d["fewshot"], world_dir(d), out, d.get("encoder"), progress=ctx.progress
    )


def summarize(c: dict, directory: Path) -> list[Summary]:
    rows = [{"embedder": name, **scores} for name, scores in c.get("summary", {}).items()]
    return [Summary("ppd-probe", "User identification and archetype accuracy per embedder", rows=rows)]


def _brief(c: dict) -> str:
    return f"{len(c['summary'])} embedders probed"


STAGE = Stage(
    "probe",
    # 3: the pair diagnostics seed every probe they fit (the figures no longer depend on what ran before);
    # 4: the synthetic world's preference read (preference_unseen)
    "4",
    upstream,
    lambda cfg: cfg.probe,
    run,
    progress="probes fitted",
    summarize=summarize,
    tags=("embed",),
    brief=_brief,
)

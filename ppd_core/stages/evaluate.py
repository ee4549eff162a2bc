"""The `evaluate` stage: generation for seen and new users, rewards, judges, win rates, the interpolation
study and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

from ppd_core.compared import TRAINED
from ppd_core.config import PPDConfig, stable_fields
from ppd_core.stage import Stage, StageContext, Summary
from ppd_core.stages.common import backbone_fields, backbone_stages, has_ceiling, shard_workers, world


def upstream(cfg: PPDConfig) -> tuple[str, ...]:
    trained = tuple(f"train_{t}" for t in cfg.train.trainers)
    ceilings = tuple(stage for stage, m in TRAINED.items() if m.ceiling and has_ceiling(cfg, stage))
    toy = backbone_stages(cfg)
    return (
        "fewshot",
        "ingest",
        "relabel",
        "embed",
        "probe",
        "tiny_models",
        *toy,
        *trained,
        *ceilings,
        *world(cfg),
    )


def section(cfg: PPDConfig) -> dict:
    return {
        "evaluate": stable_fields(cfg.evaluate),
        "backbone": backbone_fields(cfg),
        "embedder": cfg.embed.default,
        "embedders": [e.model_dump(mode="json") for e in cfg.embed.embedders],
    }


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.evaluate.stage import evaluate_stage

    return evaluate_stage(ctx.cfg, ctx.dirs, out, progress=ctx.progress, map_fn=ctx.map_fn)


def summarize(counts: dict, directory: Path) -> list[Summary]:
    summary = json.loads((directory / "summary.json").read_text())
    shown = []
    rows = [{"comparison": k, **v} for k, v in summary["headline"].items()]
    if rows:
        shown.append(Summary("ppd-win-rates", f"judge: {summary['primary_judge']}", rows=rows))
    targets = "\n".join(
        f"| {t['target']} | {t['value'] if t['value'] is None else round(t['value'], 3)} | "
        f"{'yes' if t['met'] else 'no'} |"
        for t in summary["targets"]
    )
    shown.append(
        Summary(
            "ppd-evaluate",
            markdown=f"**Evaluation** `{directory}`\n\n| target | value | met |\n|---|---|---|\n{targets}\n",
        )
    )
    shown.append(Summary("ppd-report", "PPD report", link=(directory / "report.html").as_uri()))
    return shown


def _brief(c: dict) -> str:
    new, seen = c["headline"].get("unseen:ppd_vs_base"), c["headline"].get("seen:ppd_vs_base")
    parts = [
        f"{label}: PPD beats base {r['win_rate']:.0%}"
        for label, r in (("new users", new), ("seen", seen))
        if r
    ]
    return "; ".join(parts) + f"; report: {c['report']}"


STAGE = Stage(
    "evaluate",
    "4",
    upstream,
    section,
    run,
    progress="evaluate steps",
    workers=shard_workers,
    summarize=summarize,
    tags=("evaluate",),
    brief=_brief,
)

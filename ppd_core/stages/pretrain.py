"""The `pretrain` stage: the toy backbone trained from scratch on the ingested images (toy runs only)."""

from __future__ import annotations

from pathlib import Path

from ppd_core.config import PPDConfig, stable_fields
from ppd_core.stage import Stage, StageContext, Summary


def section(cfg: PPDConfig) -> dict:
    return {"pretrain": stable_fields(cfg.pretrain), "resolution": cfg.backbone.resolution}


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.train.pretrain import pretrain

    return pretrain(ctx.cfg.pretrain, ctx.cfg.backbone, ctx.dirs["ingest"], out, progress=ctx.progress)


def summarize(c: dict, directory: Path) -> list[Summary]:
    return [
        Summary(
            "ppd-pretrain",
            markdown=f"**Toy backbone pretrained** `{directory}`: {c.get('steps')} steps, final loss "
            f"{c.get('final_loss')}, caption colour accuracy {c.get('colour_accuracy')}.",
        )
    ]


STAGE = Stage(
    "pretrain",
    "1",
    lambda cfg: ("ingest",),
    section,
    run,
    progress="pretrain steps",
    summarize=summarize,
    tags=("train", "gpu"),
)

"""The `cache_latents` stage: the backbone's training latents and text states of every image and caption the
trainers read, computed once and shared by every train stage."""

from __future__ import annotations

from pathlib import Path

from ppd_core.stage import Stage, StageContext
from ppd_core.stages.common import backbone_fields, backbone_stages


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.models.factory import load_backbone
    from ppd_core.train.cache import cache_latents

    backbone = load_backbone(ctx.cfg.backbone, ctx.dirs.get("pretrain"))
    return cache_latents(
        backbone, ctx.dirs["ingest"], ctx.dirs["fewshot"], out, seed=ctx.cfg.run.seed, progress=ctx.progress
    )


STAGE = Stage(
    "cache_latents",
    "1",
    lambda cfg: ("ingest", "fewshot", *backbone_stages(cfg)),
    lambda cfg: {"backbone": backbone_fields(cfg)},
    run,
    progress="cached images and captions",
    tags=("train", "gpu"),
    brief=lambda c: f"{c['images']:,} image latents, {c['captions']:,} captions",
)

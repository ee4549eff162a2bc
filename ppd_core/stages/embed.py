"""The `embed` stage: every configured embedder over every shot set, in atomic shards."""

from __future__ import annotations

from pathlib import Path

from ppd_core.config import PPDConfig
from ppd_core.data.world_render import world_dir
from ppd_core.stage import Stage, StageContext, Summary
from ppd_core.stages.common import world


def upstream(cfg: PPDConfig) -> tuple[str, ...]:
    from ppd_core.embed.extract import needs_encoder, needs_tiny_models, needs_world

    encoder = ("encoder",) if needs_encoder(cfg.embed) else ()
    encoder_tiny = encoder and cfg.encoder.features.model is None
    tiny = ("tiny_models",) if needs_tiny_models(cfg.embed) or encoder_tiny else ()
    return ("fewshot", "ingest", *encoder, *tiny, *(world(cfg) if needs_world(cfg.embed) else ()))


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.embed.extract import EmbedInputs, embed_stage

    d = ctx.dirs
    inputs = EmbedInputs(d["fewshot"], d["ingest"], d.get("tiny_models"), world_dir(d), d.get("encoder"))
    return embed_stage(ctx.cfg.embed, inputs, out, map_fn=ctx.map_fn, progress=ctx.progress)


def summarize(c: dict, directory: Path) -> list[Summary]:
    rows = [
        {
            "embedder": name,
            "shape": str(info.get("shape")),
            "sets": info["sets"],
            "computed": info["computed"],
            "reused": info["reused"],
        }
        for name, info in c.get("embedders", {}).items()
    ]
    return [Summary("ppd-embed-summary", f"Embeddings, {directory}", rows=rows)]


STAGE = Stage(
    "embed",
    "1",
    upstream,
    lambda cfg: cfg.embed,
    run,
    resumable=True,
    progress="embedded shot sets",
    workers=lambda cfg: cfg.embed.shard_workers,
    summarize=summarize,
    tags=("embed",),
)

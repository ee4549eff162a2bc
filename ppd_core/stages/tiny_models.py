"""The `tiny_models` stage: the offline default VLM, open_clip model and reward models (random weights
from small configs, saved in the real on-disk formats)."""

from __future__ import annotations

from pathlib import Path

from ppd_core.stage import Stage, StageContext, no_upstream


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.tiny import build_tiny_models

    return build_tiny_models(ctx.cfg.tiny_models, out, progress=ctx.progress)


STAGE = Stage(
    "tiny_models",
    "2",
    no_upstream,
    lambda cfg: cfg.tiny_models,
    run,
    progress="built models",
    tags=("models",),
    brief=lambda c: f"{len(c['models'])} offline models, random weights by design",
)

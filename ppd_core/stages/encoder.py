"""The `encoder` stage: the few-shot preference encoder trained on seen users' labels."""

from __future__ import annotations

from pathlib import Path

from ppd_core.config import PPDConfig
from ppd_core.stage import Stage, StageContext, counts_table


def upstream(cfg: PPDConfig) -> tuple[str, ...]:
    return ("fewshot", "ingest", *(("tiny_models",) if cfg.encoder.features.model is None else ()))


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.embed.encoder_stage import EncoderInputs, encoder_stage

    d = ctx.dirs
    inputs = EncoderInputs(d["fewshot"], d["ingest"], d.get("tiny_models"))
    return encoder_stage(ctx.cfg.encoder, ctx.cfg.fewshot.shots, inputs, out, progress=ctx.progress)


STAGE = Stage(
    "encoder",
    "2",
    upstream,
    lambda cfg: cfg.encoder,
    run,
    resumable=True,
    progress="encoder training steps",
    summarize=counts_table(
        (
            "members",
            "train_users",
            "validation_users",
            "train_pairs",
            "best_step",
            "val_pair_accuracy",
            "seconds",
        ),
        "ppd-encoder-summary",
        "Few-shot preference encoder",
    ),
    tags=("embed",),
    brief=lambda c: (
        f"held-out pair accuracy {c['val_pair_accuracy']:.3f} "
        + (
            f"(mean of {c['members']} members)"
            if c.get("members", 1) > 1
            else f"(best step {c['best_step']})"
        )
    ),
)

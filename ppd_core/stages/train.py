"""The train stages, one per trained model of the compared-models table (:mod:`ppd_core.compared`): the
user adapter fine-tuned with that model's objective through DeepSpeed, then exported."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from ppd_core.compared import TRAINED
from ppd_core.config import PPDConfig, stable_fields
from ppd_core.stage import Stage, StageContext, Summary
from ppd_core.stages.common import backbone_fields, backbone_stages, train_embedder

# train keys that choose which stages run, not what one of them computes
_NOT_IN_FINGERPRINT = ("trainers", "ceiling_embedder", "shots_ceiling_embedder")


def section(stage: str, cfg: PPDConfig) -> dict:
    train = {k: v for k, v in stable_fields(cfg.train).items() if k not in _NOT_IN_FINGERPRINT}
    return {
        "train": train,
        "adapter": stable_fields(cfg.adapter),
        "backbone": backbone_fields(cfg),
        "embedder": train_embedder(cfg, stage),
    }


def run(stage: str, ctx: StageContext, out: Path) -> dict:
    from ppd_core.train.stage import train_stage

    embedder = train_embedder(ctx.cfg, stage)
    return train_stage(
        ctx.cfg, TRAINED[stage].trainer, ctx.dirs, out, embedder=embedder, progress=ctx.progress
    )


def run_joint(stages: Sequence[str], contexts: Sequence[StageContext], outs: Sequence[Path]) -> list[dict]:
    """The train stages ``stages`` in one launch (:func:`ppd_core.train.stage.train_stages`)."""
    from ppd_core.train.stage import train_stages

    ctx = contexts[0]
    if any(c.dirs != ctx.dirs for c in contexts):
        raise ValueError("train stages trained in one launch must read the same upstream outputs")
    runs = [
        (TRAINED[s].trainer, train_embedder(c.cfg, s), out)
        for s, c, out in zip(stages, contexts, outs, strict=True)
    ]
    return train_stages(ctx.cfg, runs, dict(ctx.dirs), progress=ctx.progress)


def summarize(stage: str, c: dict, directory: Path) -> list[Summary]:
    return [
        Summary(
            f"ppd-{stage.replace('_', '-')}",
            markdown=f"**{stage}** `{directory}`: {c.get('steps')} steps, held-out implicit accuracy "
            f"{c.get('heldout_implicit_acc')}, {c.get('mean_step_s')} s/step. Adapter export: `{directory}/export/`.",
        )
    ]


def train_stage_for(stage: str) -> Stage:
    return Stage(
        stage,
        "1",
        lambda cfg: ("cache_latents", "embed", "fewshot", *backbone_stages(cfg)),
        partial(section, stage),
        partial(run, stage),
        resumable=True,
        progress=f"{stage} steps",
        summarize=partial(summarize, stage),
        tags=("train", "gpu"),
        brief=lambda c: f"{c['steps']} steps, held-out implicit accuracy {c['heldout_implicit_acc']:.3f}",
        joint=run_joint,
    )


STAGES = tuple(train_stage_for(stage) for stage in TRAINED)

"""The `fewshot` stage: seen/unseen users, K-shot sets per user, training and evaluation pairs."""

from __future__ import annotations

from pathlib import Path

from ppd_core.stage import Stage, StageContext, counts_table


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.data.fewshot import sample_fewshot

    return sample_fewshot(
        ctx.cfg.fewshot, ctx.dirs["ingest"], out, ctx.dirs["relabel"], progress=ctx.progress
    )


STAGE = Stage(
    "fewshot",
    "3",
    lambda cfg: ("ingest", "relabel"),
    lambda cfg: cfg.fewshot,
    run,
    progress="planned users",
    summarize=counts_table(
        ("pairs_in", "users_seen", "users_unseen", "shot_sets", "train_pairs", "eval_pairs"),
        "ppd-fewshot-summary",
        "Few-shot sampling",
    ),
    tags=("data",),
    brief=lambda c: (
        f"{c['users_seen']} seen and {c['users_unseen']} new users, {sum(c['shot_sets'].values())} shot sets, {c['train_pairs']:,} training pairs"
    ),
)

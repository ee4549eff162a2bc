"""The `relabel` stage: reward models become users, each relabelling a sample of the ingested pairs."""

from __future__ import annotations

from pathlib import Path

from ppd_core.config import PPDConfig, stable_fields
from ppd_core.data.world_render import world_dir
from ppd_core.stage import Stage, StageContext, Summary
from ppd_core.stages.common import shard_workers, world


def upstream(cfg: PPDConfig) -> tuple[str, ...]:
    from ppd_core.rewards.relabel import needs_tiny_models, needs_world

    specs = cfg.relabel_rewards()
    tiny = ("tiny_models",) if needs_tiny_models(specs) else ()
    return ("ingest", *tiny, *(world(cfg) if needs_world(specs) else ()))


def section(cfg: PPDConfig) -> dict:
    return {
        "relabel": stable_fields(cfg.relabel),
        "rewards": [spec.model_dump(mode="json") for spec in cfg.relabel_rewards()],
    }


def run(ctx: StageContext, out: Path) -> dict:
    from ppd_core.rewards.relabel import relabel

    d = ctx.dirs
    return relabel(
        ctx.cfg.relabel,
        ctx.cfg.relabel_rewards(),
        d["ingest"],
        out,
        d.get("tiny_models"),
        world_dir(d),
        progress=ctx.progress,
        map_fn=ctx.map_fn,
    )


def summarize(c: dict, directory: Path) -> list[Summary]:
    rows = [{"reward": name, **info, "skipped": ""} for name, info in c.get("reward_users", {}).items()]
    rows += [{"reward": name, "skipped": reason} for name, reason in c.get("rewards_skipped", {}).items()]
    return [Summary("ppd-relabel-reward-users", f"Reward users, {directory}", rows=rows)]


STAGE = Stage(
    "relabel",
    "1",
    upstream,
    section,
    run,
    progress="scored images",
    workers=shard_workers,
    summarize=summarize,
    tags=("data",),
    brief=lambda c: f"{len(c['reward_users'])} reward users, {c['rows']:,} relabelled pairs",
)

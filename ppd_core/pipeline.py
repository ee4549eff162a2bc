"""Plan and execute any registered stage (:mod:`ppd_core.stages`): fingerprints, output directories, reuse.

The stages themselves (order, inputs, config, bodies) live in the registry; Prefect tasks, the CLI and a
notebook all go through :func:`plan` and :func:`execute`, so they agree on output directories and on what
counts as complete::

    cfg = load_config("configs/toy.yaml")
    layout = RunLayout(cfg.run.root)
    outcomes = run_stages(cfg, ["fewshot"])   # runs (or reuses) synthesize -> ingest -> relabel -> fewshot

A stage's fingerprint covers its config section (without volatile fields), the digests of the
upstream manifests it reads, its code version, and for ingestion of external files a listing of
those files (path, size, version token), so new or changed source files re-ingest. With
``ingest.partitioned`` the drivers ingest the window's missing or failed days first
(:mod:`ppd_core.data.partitions`) and the ``ingest`` stage is their union, fingerprinted by the days'
manifest digests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppd_core.config import PPDConfig, fingerprint
from ppd_core.errors import StageError
from ppd_core.layout import RunLayout
from ppd_core.manifest import Manifest, StageOutcome, building, run_stage
from ppd_core.stage import MapFn, Progress, Stage, StageContext
from ppd_core.stages import STAGES
from ppd_core.stages.common import backbone_stages, has_ceiling, train_embedder  # noqa: F401 (re-exported)


def stage_names() -> tuple[str, ...]:
    """Every registered stage, in pipeline order."""
    return tuple(STAGES)


def stage(name: str) -> Stage:
    """The registered stage ``name``."""
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages are: {', '.join(stage_names())}")
    return STAGES[name]


def upstream_of(name: str, cfg: PPDConfig) -> tuple[str, ...]:
    """Stages whose manifests ``name`` reads."""
    return stage(name).upstream(cfg)


def default_stages(cfg: PPDConfig) -> list[str]:
    """The whole DAG: everything ``evaluate`` (and the probe) needs."""
    return expand(["probe", "evaluate"], cfg)


def expand(stages: Iterable[str] | None, cfg: PPDConfig) -> list[str]:
    """The requested stages plus everything upstream of them, in pipeline order."""
    if not stages:
        return default_stages(cfg)
    requested = list(stages)
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(stage_names())}")
    if cfg.ingest.source and "synthesize" in requested:
        raise StageError(
            "synthesize makes the embedded synthetic world; it has no use with --source (drop it from --stages)"
        )
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for up in upstream_of(name, cfg):
                visit(up)

    for name in requested:
        visit(name)
    return [s for s in stage_names() if s in needed]


@dataclass(frozen=True)
class StagePlan:
    """Everything decided about a stage before it runs."""

    stage: str
    fingerprint: str
    directory: Path
    upstream: dict[str, str]  # upstream stage -> manifest digest
    inputs: dict[str, Any] = field(default_factory=dict)  # resolved inputs (e.g. source files)


def plan(cfg: PPDConfig, name: str, upstream: Mapping[str, Manifest]) -> StagePlan:
    """Fingerprint and output directory of stage ``name`` given its upstream manifests."""
    spec = stage(name)
    needs = spec.upstream(cfg)
    missing = [u for u in needs if u not in upstream]
    if missing:
        raise StageError(f"stage {name} needs the output of {', '.join(missing)}")
    digests = {u: upstream[u].digest for u in needs}
    layout = RunLayout(cfg.run.root)
    dirs = {u: layout.stage_dir(u, upstream[u].fingerprint) for u in needs}
    inputs, extra = spec.resolve(cfg, dirs) if spec.resolve else ({}, {})
    fp = fingerprint(name, spec.section(cfg), digests, spec.version, extra)
    return StagePlan(name, fp, layout.stage_dir(name, fp), digests, inputs)


def execute(
    cfg: PPDConfig,
    p: StagePlan,
    upstream: Mapping[str, Manifest],
    progress: Progress | None = None,
    map_fn: MapFn | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> StageOutcome:
    """Run (or reuse) one planned stage. ``map_fn(fn, items)`` lets an orchestrator fan out shard work.

    One process at a time computes a stage output (a lock beside its partial directory): a second
    ``ppd run`` on the same root waits for it (``on_wait(message)`` says so once) and reuses it."""
    spec = stage(p.stage)
    layout = RunLayout(cfg.run.root)
    dirs = {u: layout.stage_dir(u, m.fingerprint) for u, m in upstream.items()}
    ctx = StageContext(cfg, dirs, p.inputs, progress, map_fn)
    return run_stage(
        layout,
        p.stage,
        p.fingerprint,
        lambda out: spec.run(ctx, out),
        code_version=spec.version,
        config=cfg.model_dump(mode="json"),
        upstream=p.upstream,
        resume=spec.resumable,
        on_wait=on_wait,
    )


def execute_joint(
    cfg: PPDConfig,
    plans: Sequence[StagePlan],
    upstream: Mapping[str, Manifest],
    progress: Progress | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> dict[str, StageOutcome]:
    """Run (or reuse) several planned stages that share a joint body (``Stage.joint``), e.g. the train stages:
    each keeps its own output, lock, partial directory (kept for resume), manifest and reuse, exactly as
    :func:`execute` would, but the ones not yet complete are built by one call of the joint body.

    The locks are taken in pipeline order, so two processes running overlapping groups cannot deadlock.
    ``upstream`` holds the manifests every one of them reads."""
    plans = sorted(plans, key=lambda p: stage_names().index(p.stage))
    specs = [stage(p.stage) for p in plans]
    if len(plans) == 1 or specs[0].joint is None or any(s.joint is not specs[0].joint for s in specs):
        raise StageError(f"stages {', '.join(p.stage for p in plans)} have no joint body in common")
    layout = RunLayout(cfg.run.root)
    dirs = {u: layout.stage_dir(u, m.fingerprint) for u, m in upstream.items()}
    with contextlib.ExitStack() as stack:
        builds = [
            stack.enter_context(
                building(
                    layout,
                    p.stage,
                    p.fingerprint,
                    code_version=s.version,
                    config=cfg.model_dump(mode="json"),
                    upstream=p.upstream,
                    resume=s.resumable,
                    on_wait=on_wait,
                )
            )
            for p, s in zip(plans, specs, strict=True)
        ]
        due = [(p, b) for p, b in zip(plans, builds, strict=True) if b.outcome is None]
        if len(due) == 1:
            p, b = due[0]
            b.commit(stage(p.stage).run(StageContext(cfg, dirs, p.inputs, progress), b.partial))
        elif due:
            names = [p.stage for p, _ in due]
            contexts = [StageContext(cfg, dirs, p.inputs, progress) for p, _ in due]
            counts = specs[0].joint(names, contexts, [b.partial for _, b in due])
            for (_, b), c in zip(due, counts, strict=True):
                b.commit(c)
    return {p.stage: b.outcome for p, b in zip(plans, builds, strict=True)}


def joint_groups(cfg: PPDConfig, stages: Sequence[str]) -> list[list[str]]:
    """``stages`` (in pipeline order) cut into the groups that run together: consecutive stages sharing a
    joint body (``Stage.joint``) and reading the same upstream form one group; every other stage is alone."""
    groups: list[list[str]] = []
    for name in stages:
        spec, last = stage(name), groups[-1] if groups else None
        if (
            last
            and spec.joint is not None
            and stage(last[0]).joint is spec.joint
            and upstream_of(last[0], cfg) == upstream_of(name, cfg)
        ):
            last.append(name)
        else:
            groups.append([name])
    return groups


def run_stages(cfg: PPDConfig, stages: Sequence[str] | None = None) -> dict[str, StageOutcome]:
    """Plain-Python driver (no Prefect): run or reuse the requested stages and their upstream; consecutive
    stages with a joint body (the train stages) that are due together are built in one go."""
    outcomes: dict[str, StageOutcome] = {}
    for group in joint_groups(cfg, expand(stages, cfg)):
        manifests = {u: outcomes[u].manifest for u in upstream_of(group[0], cfg)}
        if group[0] == "ingest" and cfg.ingest.partitioned:  # the days first: the union is planned from them
            from ppd_core.data.partitions import ingest_window

            ingest_window(cfg, {u: o.directory for u, o in outcomes.items()})
        plans = [plan(cfg, s, manifests) for s in group]
        if len(group) == 1:
            outcomes[group[0]] = execute(cfg, plans[0], manifests)
        else:
            outcomes.update(execute_joint(cfg, plans, manifests))
    return outcomes


def locate(cfg: PPDConfig, stages: Sequence[str]) -> dict[str, Path]:
    """Output directories of ``stages`` and their upstream, computing nothing: each must already be complete.
    When some are not, one error names them all (in pipeline order) and the one command that makes them."""
    from ppd_core.manifest import is_complete, load_manifest

    manifests: dict[str, Manifest] = {}
    dirs: dict[str, Path] = {}
    missing: list[str] = []
    for name in expand(stages, cfg):
        needs = upstream_of(name, cfg)
        if any(u in missing for u in needs):
            missing.append(name)  # an upstream is missing, so this output cannot exist for this config
            continue
        p = plan(cfg, name, {u: manifests[u] for u in needs})
        if not is_complete(p.directory):
            missing.append(name)
            continue
        manifests[name], dirs[name] = load_manifest(p.directory), p.directory
    if missing:
        raise StageError(
            f"{cfg.run.root} has no complete output of {', '.join(missing)} for this config; make "
            f"{'them' if len(missing) > 1 else 'it'} with: ppd run --root {cfg.run.root} --stages {','.join(stages)}"
        )
    return dirs


def preflight(cfg: PPDConfig) -> None:
    """Cheap checks of user input before any work starts (source listing and Parquet footers)."""
    if cfg.ingest.source:
        from ppd_core.data.pickapic import check_schema, open_parquet, resolve_source

        for f in resolve_source(cfg.ingest.source):
            with open_parquet(f) as pf:
                check_schema(pf.schema_arrow, f.url, cfg.ingest.images)

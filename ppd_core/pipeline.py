"""The stage graph: which stage reads which, how each one's fingerprint is formed, and how it runs.

This is the one place that knows the order of stages and their inputs; Prefect tasks, the CLI and a
notebook all go through :func:`plan` and :func:`execute`, so they agree on output directories and
on what counts as complete::

    cfg = load_config("configs/toy.yaml")
    layout = RunLayout(cfg.run.root)
    outcomes = run_stages(cfg, ["fewshot"])   # runs (or reuses) synthesize -> ingest -> fewshot

A stage's fingerprint covers its config section (without volatile fields), the digests of the
upstream manifests it reads, its code version, and for ingestion of external files a listing of
those files (path, size, version token), so new or changed source files re-ingest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ppd_core.config import PPDConfig, fingerprint
from ppd_core.errors import StageError
from ppd_core.layout import RunLayout
from ppd_core.manifest import Manifest, StageOutcome, run_stage

# Bump a stage's version when its code changes what it writes: every output of it (and downstream) is recomputed.
STAGE_VERSIONS: dict[str, str] = {"synthesize": "1", "ingest": "1", "fewshot": "1"}
STAGE_ORDER: tuple[str, ...] = tuple(STAGE_VERSIONS)

Progress = Callable[[int, int], None]


def upstream_of(stage: str, cfg: PPDConfig) -> tuple[str, ...]:
    """Stages whose manifests ``stage`` reads."""
    if stage == "ingest":
        return () if cfg.ingest.source else ("synthesize",)
    if stage == "fewshot":
        return ("ingest",)
    return ()


def default_stages(cfg: PPDConfig) -> list[str]:
    return [s for s in STAGE_ORDER if not (s == "synthesize" and cfg.ingest.source)]


def expand(stages: Iterable[str] | None, cfg: PPDConfig) -> list[str]:
    """The requested stages plus everything upstream of them, in pipeline order."""
    requested = list(stages) if stages else default_stages(cfg)
    unknown = [s for s in requested if s not in STAGE_VERSIONS]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(STAGE_ORDER)}")
    if cfg.ingest.source and "synthesize" in requested:
        raise StageError(
            "synthesize makes the embedded synthetic world; it has no use with --source (drop it from --stages)"
        )
    needed: set[str] = set()

    def visit(stage: str) -> None:
        if stage not in needed:
            needed.add(stage)
            for up in upstream_of(stage, cfg):
                visit(up)

    for stage in requested:
        visit(stage)
    return [s for s in STAGE_ORDER if s in needed]


def _section(cfg: PPDConfig, stage: str) -> BaseModel:
    return {"synthesize": cfg.world, "ingest": cfg.ingest, "fewshot": cfg.fewshot}[stage]


@dataclass(frozen=True)
class StagePlan:
    """Everything decided about a stage before it runs."""

    stage: str
    fingerprint: str
    directory: Path
    upstream: dict[str, str]  # upstream stage -> manifest digest
    inputs: dict[str, Any] = field(default_factory=dict)  # resolved inputs (e.g. source files)


def plan(cfg: PPDConfig, stage: str, upstream: Mapping[str, Manifest]) -> StagePlan:
    """Fingerprint and output directory of ``stage`` given its upstream manifests."""
    missing = [u for u in upstream_of(stage, cfg) if u not in upstream]
    if missing:
        raise StageError(f"stage {stage} needs the output of {', '.join(missing)}")
    digests = {u: upstream[u].digest for u in upstream_of(stage, cfg)}
    extra: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    if stage == "ingest" and cfg.ingest.source:
        from ppd_core.data.pickapic import resolve_source, source_identity

        files = resolve_source(cfg.ingest.source)
        inputs["files"] = files
        extra["source"] = source_identity(files)
    fp = fingerprint(stage, _section(cfg, stage), digests, STAGE_VERSIONS[stage], extra)
    return StagePlan(stage, fp, RunLayout(cfg.run.root).stage_dir(stage, fp), digests, inputs)


def _build(cfg: PPDConfig, p: StagePlan, upstream: Mapping[str, Manifest], progress: Progress | None):
    """The stage body as ``partial_dir -> counts``."""
    layout = RunLayout(cfg.run.root)
    if p.stage == "synthesize":
        from ppd_core.data.synthetic import synthesize

        return lambda out: synthesize(cfg.world, out)
    if p.stage == "ingest":
        from ppd_core.data.ingest import ingest
        from ppd_core.data.pickapic import resolve_source

        if cfg.ingest.source:
            files = p.inputs["files"]
        else:
            synth = upstream["synthesize"]
            files = resolve_source(str(layout.stage_dir("synthesize", synth.fingerprint) / "data"))
        return lambda out: ingest(cfg.ingest, files, out, progress=progress)
    if p.stage == "fewshot":
        from ppd_core.data.fewshot import sample_fewshot

        ing = upstream["ingest"]
        return lambda out: sample_fewshot(cfg.fewshot, layout.stage_dir("ingest", ing.fingerprint), out)
    raise StageError(f"no body for stage {p.stage}")


def execute(
    cfg: PPDConfig,
    p: StagePlan,
    upstream: Mapping[str, Manifest],
    progress: Progress | None = None,
) -> StageOutcome:
    """Run (or reuse) one planned stage."""
    return run_stage(
        RunLayout(cfg.run.root),
        p.stage,
        p.fingerprint,
        _build(cfg, p, upstream, progress),
        code_version=STAGE_VERSIONS[p.stage],
        config=cfg.model_dump(mode="json"),
        upstream=p.upstream,
    )


def run_stages(cfg: PPDConfig, stages: Sequence[str] | None = None) -> dict[str, StageOutcome]:
    """Plain-Python driver (no Prefect): run or reuse the requested stages and their upstream."""
    outcomes: dict[str, StageOutcome] = {}
    for stage in expand(stages, cfg):
        manifests = {u: outcomes[u].manifest for u in upstream_of(stage, cfg)}
        outcomes[stage] = execute(cfg, plan(cfg, stage, manifests), manifests)
    return outcomes


def preflight(cfg: PPDConfig) -> None:
    """Cheap checks of user input before any work starts (source listing and Parquet footers)."""
    if cfg.ingest.source:
        from ppd_core.data.pickapic import check_schema, open_parquet, resolve_source

        for f in resolve_source(cfg.ingest.source):
            check_schema(open_parquet(f).schema_arrow, f.url, cfg.ingest.images)

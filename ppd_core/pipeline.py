"""The stage graph: which stage reads which, how each one's fingerprint is formed, and how it runs.

This is the one place that knows the order of stages and their inputs; Prefect tasks, the CLI and a
notebook all go through :func:`plan` and :func:`execute`, so they agree on output directories and
on what counts as complete::

    cfg = load_config("configs/toy.yaml")
    layout = RunLayout(cfg.run.root)
    outcomes = run_stages(cfg, ["fewshot"])   # runs (or reuses) synthesize -> ingest -> relabel -> fewshot

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

from ppd_core.config import PPDConfig, fingerprint, stable_fields
from ppd_core.errors import StageError
from ppd_core.layout import RunLayout
from ppd_core.manifest import Manifest, StageOutcome, run_stage

# Bump a stage's version when its code changes what it writes: every output of it (and downstream) is recomputed.
STAGE_VERSIONS: dict[str, str] = {
    "synthesize": "2",
    "ingest": "2",
    "tiny_models": "2",
    "relabel": "1",
    "fewshot": "2",
    "encoder": "2",
    "embed": "1",
    "probe": "2",
    "pretrain": "1",
    "cache_latents": "1",
    "train_ppd": "1",
    "train_dpo": "1",
    "train_sft": "1",
    "train_ppd_true": "1",
    "train_ppd_shots": "1",
    "evaluate": "4",
}
# train stage -> trainer; train_ppd_true and train_ppd_shots are the ppd trainer on the ceiling embedders (by
# default the world's true preference vector, and the true attribute differences of the same K shots)
TRAINERS = {
    "train_ppd": "ppd",
    "train_dpo": "dpo",
    "train_sft": "sft",
    "train_ppd_true": "ppd",
    "train_ppd_shots": "ppd",
}
# ceiling train stage -> the train config field naming its embedder
CEILINGS = {"train_ppd_true": "ceiling_embedder", "train_ppd_shots": "shots_ceiling_embedder"}
TRAIN_STAGES = tuple(TRAINERS)
STAGE_ORDER: tuple[str, ...] = tuple(STAGE_VERSIONS)

Progress = Callable[[int, int], None]
MapFn = Callable[[Callable, Sequence], Iterable]
# stages whose partial directory survives a crash (their shards complete atomically)
RESUMABLE = frozenset({"encoder", "embed", *TRAIN_STAGES})


def upstream_of(stage: str, cfg: PPDConfig) -> tuple[str, ...]:
    """Stages whose manifests ``stage`` reads."""
    if stage == "ingest":
        return () if cfg.ingest.source else ("synthesize",)
    world = () if cfg.ingest.source else ("synthesize",)
    if stage == "relabel":
        from ppd_core.data.relabel import needs_tiny_models, needs_world

        specs = cfg.relabel_rewards()
        tiny = ("tiny_models",) if needs_tiny_models(specs) else ()
        return ("ingest", *tiny, *(world if needs_world(specs) else ()))
    if stage == "fewshot":
        return ("ingest", "relabel")
    encoder_tiny = cfg.encoder.features.model is None
    if stage == "encoder":
        return ("fewshot", "ingest", *(("tiny_models",) if encoder_tiny else ()))
    if stage == "embed":
        from ppd_core.embed.extract import needs_encoder, needs_tiny_models, needs_world

        encoder = ("encoder",) if needs_encoder(cfg.embed) else ()
        tiny = ("tiny_models",) if needs_tiny_models(cfg.embed) or (encoder and encoder_tiny) else ()
        return ("fewshot", "ingest", *encoder, *tiny, *(world if needs_world(cfg.embed) else ()))
    if stage == "probe":
        from ppd_core.embed.extract import needs_encoder

        return ("embed", "fewshot", *(("encoder",) if needs_encoder(cfg.embed) else ()), *world)
    toy = backbone_stages(cfg)
    if stage == "pretrain":
        return ("ingest",)
    if stage == "cache_latents":
        return ("ingest", "fewshot", *toy)
    if stage in TRAIN_STAGES:
        return ("cache_latents", "embed", "fewshot", *toy)
    if stage == "evaluate":
        trained = tuple(f"train_{t}" for t in cfg.train.trainers)
        ceilings = tuple(stage for stage in CEILINGS if has_ceiling(cfg, stage))
        return (
            "fewshot",
            "ingest",
            "relabel",
            "embed",
            "probe",
            "tiny_models",
            *toy,
            *trained,
            *ceilings,
            *world,
        )
    return ()


def backbone_stages(cfg: PPDConfig) -> tuple[str, ...]:
    """Stages a backbone is loaded from: the toy model's ``pretrain``; none for a given checkpoint."""
    return ("pretrain",) if cfg.backbone.kind == "toy" and cfg.backbone.model is None else ()


def has_ceiling(cfg: PPDConfig, stage: str = "train_ppd_true") -> bool:
    """Whether a ceiling train stage runs: its embedder is set and can run here (world references: toy only)."""
    from ppd_core.embed.extract import WORLD_KINDS

    name = getattr(cfg.train, CEILINGS[stage])
    kinds = {e.name: e.kind for e in cfg.embed.embedders}
    return name in kinds and (kinds[name] not in WORLD_KINDS or not cfg.ingest.source)


def train_embedder(cfg: PPDConfig, stage: str) -> str:
    """The embedder whose vectors condition a train stage."""
    if stage in CEILINGS:
        if not has_ceiling(cfg, stage):
            raise StageError(
                f"{stage} needs train.{CEILINGS[stage]} naming an embedder of embed.embedders (a synthetic-world "
                "reference only without --source)"
            )
        return getattr(cfg.train, CEILINGS[stage])
    return cfg.embed.default


def default_stages(cfg: PPDConfig) -> list[str]:
    """The whole DAG: everything ``evaluate`` (and the probe) needs."""
    return expand(["probe", "evaluate"], cfg)


def expand(stages: Iterable[str] | None, cfg: PPDConfig) -> list[str]:
    """The requested stages plus everything upstream of them, in pipeline order."""
    if not stages:
        return default_stages(cfg)
    requested = list(stages)
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


def _backbone_fields(cfg: PPDConfig) -> dict:
    """The backbone section without keys its kind ignores (``effnet`` matters to cascade only)."""
    fields = stable_fields(cfg.backbone)
    if cfg.backbone.kind != "cascade":
        fields.pop("effnet", None)
    return fields


def _section(cfg: PPDConfig, stage: str) -> BaseModel | dict:
    """The config a stage's output depends on (volatile fields are dropped by ``fingerprint``)."""
    if stage == "pretrain":
        return {"pretrain": stable_fields(cfg.pretrain), "resolution": cfg.backbone.resolution}
    if stage == "cache_latents":
        return {"backbone": _backbone_fields(cfg)}
    if stage in TRAIN_STAGES:
        skip = ("trainers", "ceiling_embedder", "shots_ceiling_embedder")
        train = {k: v for k, v in stable_fields(cfg.train).items() if k not in skip}
        return {
            "train": train,
            "adapter": stable_fields(cfg.adapter),
            "backbone": _backbone_fields(cfg),
            "embedder": train_embedder(cfg, stage),
        }
    if stage == "relabel":
        return {
            "relabel": stable_fields(cfg.relabel),
            "rewards": [spec.model_dump(mode="json") for spec in cfg.relabel_rewards()],
        }
    if stage == "evaluate":
        return {
            "evaluate": stable_fields(cfg.evaluate),
            "backbone": _backbone_fields(cfg),
            "embedder": cfg.embed.default,
            "embedders": [e.model_dump(mode="json") for e in cfg.embed.embedders],
        }
    return getattr(cfg, {"synthesize": "world"}.get(stage, stage))


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


def _build(
    cfg: PPDConfig,
    p: StagePlan,
    upstream: Mapping[str, Manifest],
    progress: Progress | None,
    map_fn: MapFn | None,
):
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
    if p.stage == "tiny_models":
        from ppd_core.embed.tiny_models import build_tiny_models

        return lambda out: build_tiny_models(cfg.tiny_models, out)
    dirs = {u: layout.stage_dir(u, m.fingerprint) for u, m in upstream.items()}
    if p.stage == "relabel":
        from ppd_core.data.relabel import relabel

        specs = cfg.relabel_rewards()
        return lambda out: relabel(
            cfg.relabel, specs, dirs["ingest"], out, dirs.get("tiny_models"), world_dir(dirs)
        )
    if p.stage == "fewshot":
        from ppd_core.data.fewshot import sample_fewshot

        return lambda out: sample_fewshot(cfg.fewshot, dirs["ingest"], out, dirs["relabel"])
    if p.stage == "encoder":
        from ppd_core.embed.encoder_stage import EncoderInputs, encoder_stage

        inputs = EncoderInputs(dirs["fewshot"], dirs["ingest"], dirs.get("tiny_models"))
        return lambda out: encoder_stage(cfg.encoder, cfg.fewshot.shots, inputs, out, progress=progress)
    if p.stage == "embed":
        from ppd_core.embed.extract import EmbedInputs, embed_stage

        inputs = EmbedInputs(
            dirs["fewshot"], dirs["ingest"], dirs.get("tiny_models"), world_dir(dirs), dirs.get("encoder")
        )
        return lambda out: embed_stage(cfg.embed, inputs, out, map_fn=map_fn, progress=progress)
    if p.stage == "probe":
        from ppd_core.embed.probe_stage import probe_stage

        return lambda out: probe_stage(
            cfg.probe, dirs["embed"], dirs["fewshot"], world_dir(dirs), out, dirs.get("encoder")
        )
    if p.stage == "pretrain":
        from ppd_core.train.pretrain import pretrain

        return lambda out: pretrain(cfg.pretrain, cfg.backbone, dirs["ingest"], out, progress=progress)
    if p.stage == "cache_latents":
        from ppd_core.models.factory import load_backbone
        from ppd_core.train.cache import cache_latents

        def build_cache(out: Path) -> dict:
            backbone = load_backbone(cfg.backbone, dirs.get("pretrain"))
            return cache_latents(
                backbone, dirs["ingest"], dirs["fewshot"], out, seed=cfg.run.seed, progress=progress
            )

        return build_cache
    if p.stage in TRAIN_STAGES:
        from ppd_core.train.stage import train_stage

        trainer, embedder = TRAINERS[p.stage], train_embedder(cfg, p.stage)
        return lambda out: train_stage(cfg, trainer, dirs, out, embedder=embedder, progress=progress)
    if p.stage == "evaluate":
        from ppd_core.evaluate.stage import evaluate_stage

        return lambda out: evaluate_stage(cfg, dirs, out, progress=progress)
    raise StageError(f"no body for stage {p.stage}")


def world_dir(dirs: Mapping[str, Path]) -> Path | None:
    """The synthetic world's ground truth (``<synthesize>/world``) among stage directories, if any."""
    return Path(dirs["synthesize"]) / "world" if "synthesize" in dirs else None


def execute(
    cfg: PPDConfig,
    p: StagePlan,
    upstream: Mapping[str, Manifest],
    progress: Progress | None = None,
    map_fn: MapFn | None = None,
) -> StageOutcome:
    """Run (or reuse) one planned stage. ``map_fn(fn, items)`` lets an orchestrator fan out shard work."""
    return run_stage(
        RunLayout(cfg.run.root),
        p.stage,
        p.fingerprint,
        _build(cfg, p, upstream, progress, map_fn),
        code_version=STAGE_VERSIONS[p.stage],
        config=cfg.model_dump(mode="json"),
        upstream=p.upstream,
        resume=p.stage in RESUMABLE,
    )


def run_stages(cfg: PPDConfig, stages: Sequence[str] | None = None) -> dict[str, StageOutcome]:
    """Plain-Python driver (no Prefect): run or reuse the requested stages and their upstream."""
    outcomes: dict[str, StageOutcome] = {}
    for stage in expand(stages, cfg):
        manifests = {u: outcomes[u].manifest for u in upstream_of(stage, cfg)}
        outcomes[stage] = execute(cfg, plan(cfg, stage, manifests), manifests)
    return outcomes


def locate(cfg: PPDConfig, stages: Sequence[str]) -> dict[str, Path]:
    """Output directories of ``stages`` and their upstream, computing nothing: each must already be complete."""
    from ppd_core.manifest import is_complete, load_manifest

    manifests: dict[str, Manifest] = {}
    dirs: dict[str, Path] = {}
    for stage in expand(stages, cfg):
        p = plan(cfg, stage, {u: manifests[u] for u in upstream_of(stage, cfg)})
        if not is_complete(p.directory):
            raise StageError(
                f"stage {stage} has no complete output for this config under {cfg.run.root} "
                f"(expected {p.directory}); run `ppd run --stages {stage}` with the same config first"
            )
        manifests[stage], dirs[stage] = load_manifest(p.directory), p.directory
    return dirs


def preflight(cfg: PPDConfig) -> None:
    """Cheap checks of user input before any work starts (source listing and Parquet footers)."""
    if cfg.ingest.source:
        from ppd_core.data.pickapic import check_schema, open_parquet, resolve_source

        for f in resolve_source(cfg.ingest.source):
            with open_parquet(f) as pf:
                check_schema(pf.schema_arrow, f.url, cfg.ingest.images)

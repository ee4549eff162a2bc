"""Upstream and config rules that several stages share."""

from __future__ import annotations

from ppd_core.compared import TRAINED
from ppd_core.config import PPDConfig, stable_fields
from ppd_core.errors import StageError


def world(cfg: PPDConfig) -> tuple[str, ...]:
    """The synthesize stage when the run is on the embedded synthetic world (no ``--source``)."""
    return () if cfg.ingest.source else ("synthesize",)


def backbone_stages(cfg: PPDConfig) -> tuple[str, ...]:
    """Stages a backbone is loaded from: the toy model's ``pretrain``; none for a given checkpoint."""
    return ("pretrain",) if cfg.backbone.kind == "toy" and cfg.backbone.model is None else ()


def backbone_fields(cfg: PPDConfig) -> dict:
    """The backbone section without keys its kind ignores (``effnet`` and ``decoder`` matter to cascade only;
    the decoder only turns latents into images, so training does not depend on it either)."""
    fields = stable_fields(cfg.backbone)
    fields.pop("decoder", None)
    if cfg.backbone.kind != "cascade":
        fields.pop("effnet", None)
    return fields


def has_ceiling(cfg: PPDConfig, stage: str = "train_ppd_true") -> bool:
    """Whether a ceiling train stage runs: its embedder is set and can run here (world references: toy only)."""
    from ppd_core.embed.extract import WORLD_KINDS

    name = TRAINED[stage].embedder(cfg)
    kinds = {e.name: e.kind for e in cfg.embed.embedders}
    return name in kinds and (kinds[name] not in WORLD_KINDS or not cfg.ingest.source)


def train_embedder(cfg: PPDConfig, stage: str) -> str:
    """The embedder whose vectors condition a train stage (the population baselines train on a constant
    embedding of the default embedder's shape)."""
    model = TRAINED[stage]
    if model.ceiling:
        if not has_ceiling(cfg, stage):
            raise StageError(
                f"{stage} needs {model.embedder_key} naming an embedder of embed.embedders (a synthetic-world "
                "reference only without --source)"
            )
        return model.embedder(cfg)
    return cfg.embed.default


def shard_workers(cfg: PPDConfig) -> int:
    """How many model-scoring or generation shards run at once (relabel, evaluate): ``run.workers`` Dask
    worker processes, each holding its own copy of the models on its own device; with threads, none (0):
    the body runs its batches in its own process, on its one copy of the models, with no per-shard task."""
    return cfg.run.workers if cfg.run.task_runner == "dask" else 0

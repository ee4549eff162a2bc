"""The stage registry: every stage of the pipeline, in pipeline order, registered here and only here.

Each stage is one :class:`~ppd_core.stage.Stage` object in its own module of this package. To add a stage,
write its module (name, version, upstream, config section, body) and add it to :data:`REGISTRY` below; the
pipeline plans and runs it, the Prefect flow gives it a task, and ``ppd run --stages`` accepts its name.
"""

from __future__ import annotations

from ppd_core.stage import Stage
from ppd_core.stages import (
    cache_latents,
    embed,
    encoder,
    evaluate,
    fewshot,
    ingest,
    pretrain,
    probe,
    relabel,
    synthesize,
    tiny_models,
    train,
)

REGISTRY: tuple[Stage, ...] = (
    synthesize.STAGE,
    ingest.STAGE,
    tiny_models.STAGE,
    relabel.STAGE,
    fewshot.STAGE,
    encoder.STAGE,
    embed.STAGE,
    probe.STAGE,
    pretrain.STAGE,
    cache_latents.STAGE,
    *train.STAGES,
    evaluate.STAGE,
)
STAGES: dict[str, Stage] = {s.name: s for s in REGISTRY}

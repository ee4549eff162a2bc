"""Prefect task: user embeddings. Shards fan out over the task runner as child tasks; a progress
artifact follows the sets done. Shards complete atomically, so a retry resumes where it stopped."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, progress_reporter, retry_if_transient, run_stage_body


@task(
    name="embed-shard",
    tags=["ppd", "embed"],
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=retry_if_transient,
)
def embed_shard_task(work, shard):
    """One shard of one embedder (returns at once when it is already complete in the partial directory)."""
    return work(shard)


def _shard_mapper(workers: int):
    """Fan shards out over a thread task runner of ``workers`` threads; yield results as they complete."""

    def map_shards(work, shards):
        with ThreadPoolTaskRunner(max_workers=workers) as runner:
            futures = runner.map(embed_shard_task, parameters={"work": unmapped(work), "shard": shards})
            for future in as_completed(futures):
                yield future.result()

    return map_shards


@task(name="embed", tags=["ppd", "embed"], **TASK_OPTIONS)
def embed_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(
        config,
        stage,
        fingerprint,
        upstream_dirs,
        progress=progress_reporter("embedded shot sets"),
        map_fn=_shard_mapper(config.embed.shard_workers),
    )
    rows = [
        {
            "embedder": name,
            "shape": str(info.get("shape")),
            "sets": info["sets"],
            "computed": info["computed"],
            "reused": info["reused"],
        }
        for name, info in result["counts"].get("embedders", {}).items()
    ]
    create_table_artifact(rows, key="ppd-embed-summary", description=f"Embeddings, {result['directory']}")
    return result

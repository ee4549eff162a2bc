"""The one Prefect task of every registered stage: cache policy, retries, progress and the stage's own
dashboard summary, around :func:`ppd_core.pipeline.execute`. A stage that fans out (``Stage.workers``)
runs its shards as child tasks on a thread task runner; shards complete atomically, so a retry resumes
where it stopped."""

from __future__ import annotations

from pathlib import Path

from prefect import Task, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from ppd_core import pipeline
from ppd_core.config import PPDConfig
from ppd_core.stage import Summary
from ppd_core.stages import STAGES
from tasks.common import TASK_OPTIONS, progress_reporter, retry_if_transient, run_stage_body


@task(
    name="stage-shard",
    tags=["ppd"],
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=retry_if_transient,
)
def shard_task(work, shard):
    """One shard of a fanned-out stage (returns at once when it is already complete in the partial directory)."""
    return work(shard)


def _shard_mapper(workers: int):
    """Fan shards out over a thread task runner of ``workers`` threads; yield results as they complete."""

    def map_shards(work, shards):
        with ThreadPoolTaskRunner(max_workers=workers) as runner:
            futures = runner.map(shard_task, parameters={"work": unmapped(work), "shard": shards})
            for future in as_completed(futures):
                yield future.result()

    return map_shards


def publish(summary: Summary) -> None:
    """Show a stage's summary as a Prefect artifact."""
    if summary.rows:
        create_table_artifact(summary.rows, key=summary.key, description=summary.description)
    if summary.markdown is not None:
        create_markdown_artifact(summary.markdown, key=summary.key, description=summary.description)
    if summary.link is not None:
        create_link_artifact(summary.link, link_text=summary.description or summary.key, key=summary.key)


@task(**TASK_OPTIONS)
def stage_task(config: PPDConfig, plan: pipeline.StagePlan, upstream_dirs: dict[str, str]) -> dict:
    """Execute one planned stage (the flow plans each stage once and passes the plan in)."""
    spec = STAGES[plan.stage]
    progress = progress_reporter(spec.progress) if spec.progress else None
    map_fn = _shard_mapper(spec.workers(config)) if spec.workers else None
    result = run_stage_body(config, plan, upstream_dirs, progress=progress, map_fn=map_fn)
    if spec.summarize is not None:
        for summary in spec.summarize(result["counts"], Path(result["directory"])):
            publish(summary)
    return result


def task_for(stage: str) -> Task:
    """The task of a registered stage: named after it, tagged with its tags."""
    return stage_task.with_options(name=stage, tags=["ppd", *STAGES[stage].tags])

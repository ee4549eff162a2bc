"""The one Prefect task of every registered stage: cache policy, retries, progress and the stage's own
dashboard summary, around :func:`ppd_core.pipeline.execute`. A stage that fans out (``Stage.workers``)
runs its shards as child tasks on the task runner ``run.task_runner`` names (threads, or Dask worker
processes: :mod:`tasks.runners`); shards complete atomically, so a retry resumes where it stopped."""

from __future__ import annotations

from pathlib import Path

from prefect import Task, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped

from ppd_core import pipeline
from ppd_core.config import PPDConfig, RunConfig
from ppd_core.stage import Summary
from ppd_core.stages import STAGES
from tasks.common import TASK_OPTIONS, progress_reporter, retry_if_transient, run_joint_body, run_stage_body
from tasks.runners import PinSpec, pin_this_worker, task_runner


@task(
    name="stage-shard",
    tags=["ppd"],
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=retry_if_transient,
)
def shard_task(work, shard, pin: PinSpec | None = None):
    """One shard of a fanned-out stage (returns at once when it is already complete in the partial directory).
    In a worker process of a local cluster, ``pin`` pins the process to its own device first."""
    if pin is not None:
        pin_this_worker(pin)
    return work(shard)


def _shard_mapper(workers: int, run: RunConfig, visible: tuple[str, ...] | None = None):
    """Fan shards out over ``run.task_runner`` with ``workers`` workers; yield results as they complete.

    ``threads``: a thread task runner of this process. ``dask``: a :class:`prefect_dask.DaskTaskRunner` over a
    local cluster of ``workers`` single-threaded worker processes, each pinned to its own device, or over the
    running cluster at ``run.cluster_address`` (its workers keep their own devices: start them with dask-cuda,
    one per GPU). A worker that dies mid-shard has its shard rerun on another by Dask; shards write
    atomically, so nothing half-written is kept. ``visible``: the devices to assign (default: each
    worker's own, from torch)."""

    def map_shards(work, shards):
        runner, pin = task_runner(run, workers, visible)
        with runner:
            futures = runner.map(
                shard_task, parameters={"work": unmapped(work), "shard": shards, "pin": unmapped(pin)}
            )
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
    workers = spec.workers(config) if spec.workers else 0
    map_fn = _shard_mapper(workers, config.run) if workers else None
    result = run_stage_body(config, plan, upstream_dirs, progress=progress, map_fn=map_fn)
    if spec.summarize is not None:
        for summary in spec.summarize(result["counts"], Path(result["directory"])):
            publish(summary)
    return result


@task(**{**TASK_OPTIONS, "cache_policy": NO_CACHE})
def joint_task(
    config: PPDConfig, plans: list[pipeline.StagePlan], upstream_dirs: dict[str, str]
) -> list[dict]:
    """Execute planned stages that share a joint body (the due train stages: one DeepSpeed launch) as one
    task; each keeps its own output and manifest, and its summary is published as its own task would.
    Never cached as a whole: the flow sends here only the stages whose outputs are not complete."""
    # one progress artifact per stage, as their own tasks would show (the runs step together)
    reporters = [progress_reporter(STAGES[p.stage].progress) for p in plans if STAGES[p.stage].progress]

    def progress(done: int, total: int) -> None:
        for report in reporters:
            report(done, total)

    results = run_joint_body(config, plans, upstream_dirs, progress=progress if reporters else None)
    for result in results:
        summarize = STAGES[result["stage"]].summarize
        for summary in summarize(result["counts"], Path(result["directory"])) if summarize else []:
            publish(summary)
    return results


def joint_task_for(stages: list[str]) -> Task:
    """The task that builds ``stages`` together, named after them joined by "+" (``ppd status`` reads
    its run as a run of each)."""
    tags = sorted({t for s in stages for t in STAGES[s].tags})
    return joint_task.with_options(name="+".join(stages), tags=["ppd", "joint", *tags])


def task_for(stage: str) -> Task:
    """The task of a registered stage: named after it, tagged with its tags."""
    return stage_task.with_options(name=stage, tags=["ppd", *STAGES[stage].tags])

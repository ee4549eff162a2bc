"""Prefect task: ingest one date partition, the unit of work of a backfill.

Its cache key is the partition's idempotency key ``ingest-<day>-<fingerprint>`` (the same name as
its output directory), so a repeated backfill or a scheduled run reaching the same day does no new
work; the caller passes ``refresh_cache=True`` when the output is missing or ``--force`` is given.
The work, the file lock and the status file are :func:`ppd_core.data.partitions.run_partition`.

:func:`ingest_partitions` submits the days a run needs (missing or failed ones) and waits for them:
``ppd backfill`` and a partitioned ``ppd run`` (and the scheduled deployments) go through it.
"""

from __future__ import annotations

from collections.abc import Iterable

from prefect import get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from ppd_core.config import PPDConfig
from ppd_core.data import partitions
from ppd_core.data.partitions import STAGE, PartitionPlan, run_partition
from ppd_core.manifest import is_complete
from tasks.common import progress_reporter


def partition_key(context, parameters: dict) -> str:
    return f"{STAGE}-{parameters['day']}-{parameters['fingerprint']}"


@task(
    name="ingest_partition",
    tags=["ppd", "data", "partition"],
    cache_key_fn=partition_key,
    persist_result=True,
    result_serializer="json",
    task_run_name="ingest_partition-{day}",
)
def ingest_partition_task(
    config: PPDConfig,
    day: str,
    fingerprint: str,
    files: list[str],
    force: bool = False,
    lock_timeout: float | None = None,
    source: str | None = None,
) -> dict:
    plan = PartitionPlan.make(config.run.root, day, fingerprint, files, source)
    logger = get_run_logger()
    status = run_partition(
        config,
        plan,
        force=force,
        lock_timeout=lock_timeout,
        progress=progress_reporter(f"ingest {plan.partition}"),
        on_wait=logger.info,
    )
    logger.info("%s: %s rows kept, %s quarantined", plan.partition, status["rows"], status["quarantined"])
    return status


def ingest_partitions(
    config: PPDConfig,
    plans: Iterable[PartitionPlan],
    force: bool = False,
    lock_timeout: float | None = None,
) -> dict[str, dict | None]:
    """Run the planned days that are missing or failed (every day with ``force``) as ``ingest_partition``
    tasks on ``run.workers`` threads and wait for them; returns each submitted day's final status (None
    for a day that failed: its error is in its status file). A day another process is writing is
    submitted too: its task waits on the day's lock and then reuses the finished output."""
    root = config.run.root
    todo = partitions.to_run(root, plans, force)
    for plan in todo:
        partitions.mark_pending(root, plan)
    if not todo:
        return {}
    with ThreadPoolTaskRunner(max_workers=max(1, config.run.workers)) as runner:
        futures = {
            plan.day: runner.submit(
                ingest_partition_task.with_options(refresh_cache=force or not is_complete(plan.directory)),
                parameters={
                    "config": config,
                    "day": plan.day,
                    "fingerprint": plan.fingerprint,
                    "files": list(plan.files),
                    "force": force,
                    "lock_timeout": lock_timeout,
                    "source": plan.source,
                },
            )
            for plan in todo
        }
        done = {}
        for day, future in futures.items():
            future.wait()
            ok = not (future.state.is_failed() or future.state.is_crashed())
            done[day] = future.result() if ok else None
    return done

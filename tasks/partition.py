"""Prefect task: ingest one date partition, the unit of work of a backfill.

Its cache key is the partition's idempotency key ``ingest-<day>-<fingerprint>`` (the same name as
its output directory), so a repeated backfill or a scheduled run reaching the same day does no new
work; the caller passes ``refresh_cache=True`` when the output is missing or ``--force`` is given.
The work, the file lock and the status file are :func:`ppd_core.data.partitions.run_partition`.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from ppd_core.config import PPDConfig
from ppd_core.data.partitions import STAGE, PartitionPlan, run_partition
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
) -> dict:
    plan = PartitionPlan.make(config.run.root, day, fingerprint, files)
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

"""The backfill flow: ingest a source one creation day at a time, only the days not yet complete.

Planning (which days the source holds, each day's fingerprint and idempotency key) and the
per-day work, lock and status are :mod:`ppd_core.data.partitions`; this flow submits one
``ingest_partition`` task per day that is missing or failed (every day with ``force``) through
:func:`tasks.partition.ingest_partitions`, the same step a partitioned ``ppd run`` takes, waits, and
publishes the partition table as an artifact. A day another process is writing is submitted too:
its task waits on the day's lock and then reuses the finished output. ``ppd backfill --stages``
then runs the pipeline flow over the union of the range's days (``ingest.partitioned``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runs import record_flow_process
from ppd_core.config import PPDConfig
from ppd_core.data import partitions
from ppd_core.errors import PPDError
from tasks.partition import ingest_partitions

TABLE_COLUMNS = ("partition", "state", "submitted", "rows", "quarantined", "seconds", "error")


@flow(name="ppd-backfill", validate_parameters=True)
def backfill_flow(
    config: PPDConfig, start: str, end: str, force: bool = False, lock_timeout: float | None = None
) -> list[dict[str, Any]]:
    """Ingest the source's days between ``start`` and ``end`` (YYYY-MM-DD, inclusive)."""
    logger = get_run_logger()
    root = config.run.root
    record_flow_process(root)  # a later command can tell when this process is gone
    plans = partitions.plan_partitions(
        config, partitions.parse_day(start, "start"), partitions.parse_day(end, "end")
    )
    partitions.record_plans(root, plans)
    done = ingest_partitions(config, plans, force, lock_timeout)
    logger.info("%d day(s) with rows in %s..%s; %d run", len(plans), start, end, len(done))
    failed = [day for day, status in done.items() if status is None]
    rows = [{**row, "submitted": row["day"] in done} for row in partitions.partition_table(root, plans)]
    if rows:
        create_table_artifact(
            [{k: _cell(r.get(k)) for k in TABLE_COLUMNS} for r in rows],
            key="ppd-backfill-partitions",
            description=f"Backfill {start}..{end} of {config.ingest.source}",
        )
    if failed:
        raise partitions.PartitionsFailed(f"{len(failed)} partition(s) failed: {', '.join(failed)}", rows)
    return rows


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def run_backfill(
    config: PPDConfig, start: str, end: str, force: bool = False, lock_timeout: float | None = None
) -> dict[str, Any]:
    """Run the flow; returns ``{flow_run_id, ok, partitions}``. A user error raises PPDError."""
    state = backfill_flow(config, start, end, force, lock_timeout, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, partitions.PartitionsFailed):
        rows = result.rows
    elif isinstance(result, PPDError | BaseException):
        raise result
    else:
        rows = result
    return {
        "flow_run_id": str(state.state_details.flow_run_id),
        "ok": state.is_completed(),
        "partitions": rows,
    }

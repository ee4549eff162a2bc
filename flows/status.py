"""``ppd status``: the latest task run of every stage from the Prefect API, beside the per-day partition
table (every day planned or ingested so far: completed, failed, running, pending or missing; from disk only).

Flow runs belong to a run root through their ``config`` parameter (``config.run.root``), so one
server shared by several roots reports each root apart. A run whose process is gone (killed, see
:mod:`flows.runs`) is marked Crashed first, so it is not listed as Running forever. A stage's counts come from its persisted
task result (the JSON summary the task returned), else from the manifest of its output directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterId, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

from flows.runs import reap_dead_runs
from ppd_core.data.partitions import status_table
from ppd_core.layout import RunLayout
from ppd_core.manifest import is_complete, load_manifest
from ppd_core.pipeline import stage_names

FLOW_RUN_LIMIT = 200  # the API's largest page
TASK_RUN_PAGES = 5


def collect_status(root: str | Path) -> dict[str, Any]:
    """``{stages, flow_runs, partitions}`` for one run root."""
    root = str(Path(root).resolve())
    with get_client(sync_client=True) as client:
        reap_dead_runs(root, client)  # runs whose process was killed: Crashed, not Running forever
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=FLOW_RUN_LIMIT)
        runs = [r for r in runs if _root_of(r.parameters) == root]
        flow_names = _flow_names(client, {r.flow_id for r in runs})
        task_runs = _task_runs(client, [r.id for r in runs]) if runs else []
    return {
        "stages": _stage_rows(task_runs, root),
        "flow_runs": [_flow_run_row(r, flow_names) for r in runs],
        "partitions": status_table(root),
    }


def _task_runs(client, flow_run_ids: list) -> list:
    """Task runs of these flow runs, newest first (a few pages: enough to see every stage's latest)."""
    found: list = []
    for page in range(TASK_RUN_PAGES):
        batch = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=FLOW_RUN_LIMIT,
            offset=page * FLOW_RUN_LIMIT,
        )
        found += batch
        if len(batch) < FLOW_RUN_LIMIT:
            break
    return found


def _root_of(parameters: dict[str, Any]) -> str | None:
    config = parameters.get("config")
    if not isinstance(config, dict):
        return None
    run_root = (config.get("run") or {}).get("root")
    return str(Path(run_root).resolve()) if run_root else None


def _flow_names(client, flow_ids: set) -> dict:
    if not flow_ids:
        return {}
    flows = client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=list(flow_ids))))
    return {f.id: f.name for f in flows}


def _stages_of(task_run) -> list[str]:
    """The stages a task run built: its own, or those of a joint task ("train_ppd+train_dpo-<n>")."""
    return task_run.name.rsplit("-", 1)[0].split("+")


def _stage_rows(task_runs: list, root: str) -> list[dict[str, Any]]:
    """The newest task run of every pipeline stage (helper tasks such as embed shards and the
    per-day ingest tasks of backfills are left out: the partition table covers the latter)."""
    latest: dict[str, Any] = {}
    for tr in task_runs:  # newest first
        for stage in _stages_of(tr):
            if stage in stage_names():
                latest.setdefault(stage, tr)
    stages = [s for s in stage_names() if s in latest]
    return [_stage_row(stage, latest[stage], root) for stage in stages]


def _stage_row(stage: str, tr, root: str) -> dict[str, Any]:
    state = tr.state
    summary = _persisted_summary(state, stage)
    directory = summary.get("directory") or _newest_output(root, stage)
    counts = summary.get("counts")
    if counts is None and directory and is_complete(directory):
        counts = load_manifest(directory).counts
    return {
        "name": stage,
        "state": state.name if state else None,
        "cached": bool(state and state.name == "Cached"),
        "start": _iso(tr.start_time),
        "seconds": _seconds(tr),
        "output_dir": directory,
        "counts": counts or {},
        "counts_from": "result" if summary.get("counts") is not None else "manifest" if counts else None,
        "task_run_id": str(tr.id),
        "flow_run_id": str(tr.flow_run_id),
    }


def _persisted_summary(state, stage: str) -> dict[str, Any]:
    """The dict a stage task returned for ``stage`` (a joint task returns one per stage), read back from
    result storage (empty when unavailable)."""
    if state is None or not state.is_completed():
        return {}
    try:
        value = state.result(raise_on_failure=False)
    except Exception:  # result record gone or unreadable: the manifest stands in
        return {}
    if isinstance(value, list):  # a joint task's results
        value = next((v for v in value if isinstance(v, dict) and v.get("stage") == stage), None)
    return value if isinstance(value, dict) else {}


def _newest_output(root: str, stage: str) -> str | None:
    dirs = [d for d in RunLayout(root).stage_dirs(stage) if is_complete(d)]
    return str(dirs[0]) if dirs else None


def _flow_run_row(run, flow_names: dict) -> dict[str, Any]:
    return {
        "id": str(run.id),
        "name": run.name,
        "flow": flow_names.get(run.flow_id),
        "state": run.state.name if run.state else None,
        "state_type": run.state.type.value if run.state else None,
        "start": _iso(run.start_time),
        "expected_start": _iso(run.expected_start_time),
        "seconds": round(run.total_run_time.total_seconds(), 3) if run.total_run_time else None,
        "run_count": run.run_count,
        "deployment_id": str(run.deployment_id) if run.deployment_id else None,
    }


def _seconds(tr) -> float | None:
    if tr.start_time and tr.end_time:
        return round((tr.end_time - tr.start_time).total_seconds(), 3)
    return round(tr.total_run_time.total_seconds(), 3) if tr.total_run_time else None


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None

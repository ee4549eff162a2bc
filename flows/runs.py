"""Which process runs a flow run, so a later command can tell a killed run from a running one.

A flow run of a run root records the process executing it in ``<root>/.prefect/flow_runs/<id>.json``
(host, pid, the process's start time and command line: pids are reused). A process killed by SIGKILL, the
OOM killer or a lost node never tells Prefect, and its flow run would stay ``Running`` forever.
:func:`reap_dead_runs` (called by ``ppd status``, ``ppd run`` and ``ppd backfill``) marks such a run
``Crashed`` in Prefect, with its unfinished task runs, when the recorded process is gone from this host.
Runs recorded on another host are left as they are (their process cannot be checked from here).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import psutil

from ppd_core.layout import RunLayout
from ppd_core.manifest import atomic_write_json

RECORDS = "flow_runs"


def records_dir(root: str | Path) -> Path:
    return RunLayout(root).prefect_home / RECORDS


def record_flow_process(root: str | Path) -> None:
    """Inside a flow run: record this process as the one running it (no-op outside a flow run)."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if not run_id:
        return
    p = psutil.Process()
    record = {
        "flow_run_id": str(run_id),
        "host": socket.gethostname(),
        "pid": p.pid,
        "create_time": p.create_time(),
        "cmdline": p.cmdline(),
        "recorded_at": time.time(),
    }
    atomic_write_json(records_dir(root) / f"{run_id}.json", record)


def process_gone(record: dict) -> bool | None:
    """True when the recorded process no longer runs, False when it does, None when this host cannot tell."""
    if record.get("host") != socket.gethostname():
        return None
    try:
        p = psutil.Process(int(record["pid"]))
        with p.oneshot():
            same = (
                abs(p.create_time() - float(record["create_time"])) < 0.1 and p.cmdline() == record["cmdline"]
            )
        return not same or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def reap_dead_runs(root: str | Path, client=None) -> list[str]:
    """Mark ``Crashed`` every unfinished flow run of this root whose recorded process is gone (and its
    unfinished task runs); drop the records of finished runs. Returns the ids marked."""
    directory = records_dir(root)
    paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not paths:
        return []
    from prefect.client.orchestration import get_client

    if client is None:
        with get_client(sync_client=True) as own:
            return _reap(paths, own)
    return _reap(paths, client)


def _reap(paths: list[Path], client) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    marked = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
            run = client.read_flow_run(record["flow_run_id"])
        except ObjectNotFound:  # a record of another database (PREFECT_API_URL changed): not ours to judge
            continue
        except (OSError, ValueError, KeyError):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if run.state is not None and run.state.is_final():
            path.unlink(missing_ok=True)
            continue
        if not process_gone(record):
            continue
        message = (
            f"the process running this flow run (pid {record['pid']} on {record['host']}) is gone: "
            "killed or crashed without reporting"
        )
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        for tr in tasks:
            if tr.state is None or not tr.state.is_final():
                client.set_task_run_state(tr.id, Crashed(message=message), force=True)
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        path.unlink(missing_ok=True)
        marked.append(str(run.id))
    return marked

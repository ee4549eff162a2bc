"""Operations tests run against a real Prefect server that this suite starts and stops.

``prefect_server``: ``prefect server start --host 127.0.0.1`` on a free port with its own
PREFECT_HOME (and SQLite database) in a temporary directory, started through the same code as
``ppd ui`` (flows/server.py) and torn down at the end of the session. ``ppd(...)`` runs the
installed CLI against it. ``pickapic_source``: a tiny Pick-a-Pic v2 source with rows on three days.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.pickapic_factory import good_row, to_table, write_parquet

REPO = Path(__file__).resolve().parents[2]
PPD = str(Path(sys.executable).parent / "ppd")
DAYS = ("2023-05-01", "2023-05-02", "2023-05-03")
ROWS_PER_DAY = 4
TINY_WORLD = [
    "--set",
    "world.num_users=8",
    "--set",
    "world.mean_pairs_per_user=12",
    "--set",
    "world.days=3",
]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The API URL of a Prefect server (SQLite under a temporary PREFECT_HOME) for this session."""
    from flows.server import free_port, start_server, stop_process

    root = tmp_path_factory.mktemp("prefect-server")
    proc, api = start_server(root, port=free_port())
    yield api
    stop_process(proc.pid)


@pytest.fixture(scope="session")
def server_env(prefect_server) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    return env


@pytest.fixture
def ppd(server_env):
    """Run the installed ``ppd`` against the session's server; ``check`` asserts exit code 0."""

    def run(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [PPD, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=server_env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ppd {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr[-4000:]}"
            )
        return proc

    return run


@pytest.fixture
def ppd_json(ppd):
    def run(*args) -> dict:
        return json.loads(ppd(*args, "--json").stdout)

    return run


@pytest.fixture
def api(prefect_server):
    """A synchronous Prefect client of the session's server (Prefect settings read at import, so
    the URL is set through ``temporary_settings``)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        yield client


def pickapic_rows() -> list[dict]:
    """ROWS_PER_DAY valid rows on each of DAYS, interleaved as a real export would be."""
    return [good_row(i, day=i % len(DAYS)) for i in range(ROWS_PER_DAY * len(DAYS))]


@pytest.fixture(scope="session")
def pickapic_source(tmp_path_factory) -> Path:
    """A Pick-a-Pic v2 directory of two files: the first in row groups spanning several days (their
    created_at is scanned), the second sorted by day in one-day row groups (statistics suffice)."""
    source = tmp_path_factory.mktemp("pickapic")
    rows = pickapic_rows()
    half = len(rows) // 2
    write_parquet(to_table(rows[:half]), source / "train-00000.parquet", row_group_size=3)
    by_day = sorted(rows[half:], key=lambda r: r["created_at"].date())
    write_parquet(to_table(by_day), source / "train-00001.parquet", row_group_size=2)
    return source


def task_runs_of(client, flow_run_id: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

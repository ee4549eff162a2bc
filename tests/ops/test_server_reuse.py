"""The root's background Prefect server: started by the first command, reused by the next ones (no new
server start, the same database), stopping itself once unused, and never adopted from a stale or foreign
record. Real `ppd` processes, real servers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from flows.server import API_URL_FILE, CLIENTS_DIR, PID_FILE, healthy, process_record
from tests.conftest import running
from tests.ops.conftest import PPD, REPO, TINY_WORLD


def _ppd(*args, idle: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PPD_RUN__SERVER_IDLE_SECONDS"] = str(idle)
    proc = subprocess.run(
        [PPD, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _record(root: Path) -> dict:
    return json.loads((root / ".prefect" / PID_FILE).read_text())


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not running(pid)


@pytest.fixture
def stop_servers():
    roots: list[Path] = []
    yield roots.append
    for root in roots:
        _ppd("ui", "--stop", "--root", root, idle=0)


def test_a_cached_run_reuses_the_server_of_the_first_run(tmp_path, stop_servers):
    root = tmp_path / "run"
    stop_servers(root)
    run = ["run", "--root", root, "--stages", "synthesize,ingest", *TINY_WORLD, "--json"]
    first = _ppd(*run, idle=120)
    assert "started a background server" in first.stderr
    server = _record(root)
    url = (root / ".prefect" / API_URL_FILE).read_text()
    assert server["idle_seconds"] == 120 and healthy(url)

    second = _ppd(*run, idle=120)
    assert "started a background server" not in second.stderr  # no new server start
    assert all(s["cached"] for s in json.loads(second.stdout)["stages"])
    assert _record(root) == server and running(server["pid"])

    status = json.loads(_ppd("status", "--root", root, "--json", idle=120).stdout)
    assert status["api"] == url and _record(root) == server
    pipeline_runs = [r for r in status["flow_runs"] if r["flow"] == "ppd-pipeline"]
    assert [r["state"] for r in pipeline_runs] == ["Completed", "Completed"]  # both runs, one database
    assert {s["name"]: s["state"] for s in status["stages"]} == {"synthesize": "Cached", "ingest": "Cached"}
    assert not list((root / ".prefect" / CLIENTS_DIR).glob("*.json"))  # the commands unregistered


@pytest.mark.slow  # ~40 s on 2 cores: waits out the idle periods twice
def test_the_server_stops_itself_when_unused_but_not_while_a_client_lives(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    _ppd("status", "--root", root, idle=2)
    server = _record(root)["pid"]
    client = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        lease = root / ".prefect" / CLIENTS_DIR / f"{client.pid}.json"
        lease.write_text(json.dumps(process_record(client.pid)))
        assert not _wait_gone(server, 8)  # idle for 4 periods, but a client process still runs
        assert (root / ".prefect" / API_URL_FILE).exists()
    finally:
        client.kill()
        client.wait()
    assert _wait_gone(server, 30)
    assert not (root / ".prefect" / API_URL_FILE).exists() and not (root / ".prefect" / PID_FILE).exists()
    assert not lease.exists()  # a dead client's record is dropped


@pytest.mark.slow  # about 50 s on 2 cores: three server starts
def test_a_stale_or_foreign_server_record_is_not_trusted(tmp_path, stop_servers):
    other, root = tmp_path / "other", tmp_path / "run"
    other.mkdir()
    stop_servers(other)
    stop_servers(root)
    _ppd("status", "--root", other, idle=60)
    foreign_url = (other / ".prefect" / API_URL_FILE).read_text()
    foreign = _record(other)
    home = root / ".prefect"
    home.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        # another root's live server: its URL with a record of an unrelated process, then its whole record
        for record in (process_record(bystander.pid), foreign):
            (home / API_URL_FILE).write_text(foreign_url)
            (home / PID_FILE).write_text(json.dumps(record))
            status = json.loads(_ppd("status", "--root", root, "--json", idle=60).stdout)
            assert status["api"] != foreign_url and healthy(status["api"])
            mine = _record(root)
            assert mine["pid"] not in (foreign["pid"], bystander.pid)
            assert json.loads(Path(home / PID_FILE).read_text()) == mine
            _ppd("ui", "--stop", "--root", root, idle=0)
            assert _wait_gone(mine["pid"], 30)
        assert bystander.poll() is None and running(foreign["pid"])  # neither was signalled
        # a stale record: the server is gone, its port closed
        (home / API_URL_FILE).write_text(foreign_url.replace(foreign_url.split(":")[-1], "9/api"))
        (home / PID_FILE).write_text(json.dumps({**foreign, "pid": 2**22 + 7}))
        status = json.loads(_ppd("status", "--root", root, "--json", idle=60).stdout)
        assert status["api"] == (home / API_URL_FILE).read_text() and healthy(status["api"])
    finally:
        bystander.kill()
        bystander.wait()

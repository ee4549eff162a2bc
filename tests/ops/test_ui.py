"""`ppd ui`: a real Prefect server for a run root, used by later CLI calls on that root, whose flow
run page loads in headless Chromium with the run's artifacts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flows.server import API_URL_FILE, free_port, healthy
from tests.conftest import chromium_binary
from tests.ops.conftest import DAYS, PPD, REPO

SCREENSHOT = REPO / "benchmarks" / "results" / "ui_flow_run.png"


@pytest.fixture(scope="module")
def ui_root(tmp_path_factory, pickapic_source):
    """A run root served by `ppd ui --background` (no PREFECT_API_URL in the environment), with one
    backfill run made through it. Yields (root, port, what `ppd ui` printed, flow run id, ppd)."""
    root = tmp_path_factory.mktemp("ui") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}

    def ppd(*args):
        proc = subprocess.run(
            [PPD, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    port = free_port()
    printed = ppd("ui", "--root", root, "--port", port, "--background")
    try:
        backfill = ["--source", pickapic_source, "--start", DAYS[0], "--end", DAYS[-1], "--json"]
        flow_run = json.loads(ppd("backfill", "--root", root, *backfill))["flow_run_id"]
        yield root, port, printed, flow_run, ppd
    finally:
        ppd("ui", "--stop", "--root", root)
    assert not (root / ".prefect" / API_URL_FILE).exists()


def test_ui_starts_a_server_that_later_cli_calls_use(ui_root):
    root, port, printed, flow_run, ppd = ui_root
    api = f"http://127.0.0.1:{port}/api"
    assert f"http://127.0.0.1:{port}" in printed
    assert (root / ".prefect" / API_URL_FILE).read_text() == api and healthy(api)
    assert (root / ".prefect" / "prefect.db").is_file()  # SQLite under the run root
    status = json.loads(ppd("status", "--root", root, "--json"))  # the backfill and this call used it
    assert status["api"] == api and status["flow_runs"][0]["id"] == flow_run


@pytest.mark.slow  # ~25 s with chromium installed, minutes when the fixture has to apt-get it
def test_flow_run_page_shows_its_artifacts_in_chromium(ui_root):
    _, port, _, flow_run, _ = ui_root
    chromium = chromium_binary()
    if chromium is None:
        pytest.skip("chromium is not installed and apt-get install chromium failed")
    url = f"http://127.0.0.1:{port}/v2/runs/flow-run/{flow_run}?tab=Artifacts"
    headless = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    headless += ["--window-size=1600,1000", "--virtual-time-budget=20000"]
    dom = subprocess.run([*headless, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "ppd-backfill-partitions" in dom  # the table artifact's card on the Artifacts tab
    assert f"ingest created_date={DAYS[0]}" in dom  # a progress artifact of one partition
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [*headless, f"--screenshot={SCREENSHOT}", url], capture_output=True, timeout=120, check=True
    )
    assert SCREENSHOT.stat().st_size > 10_000 and Path(SCREENSHOT).read_bytes()[:4] == b"\x89PNG"


def _ppd(*args, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run(
        [PPD, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.mark.parametrize("url", ["http://203.0.113.7:4200/api", "http://evil.example:4200/api", "file:///x"])
def test_recorded_api_url_must_be_loopback(tmp_path, url):
    home = tmp_path / ".prefect"
    home.mkdir()
    (home / API_URL_FILE).write_text(url)
    for command in (["status"], ["ui"]):
        proc = _ppd(*command, "--root", tmp_path)
        assert proc.returncode == 2 and "not a loopback address" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_ui_stop_signals_only_the_server_it_started(tmp_path):
    from flows.server import PID_FILE, is_loopback_url, process_record

    assert is_loopback_url("http://127.0.0.1:4200/api") and is_loopback_url("http://[::1]:9/api")
    home = tmp_path / ".prefect"
    home.mkdir()
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # a pid of another process: a bare pid (older record), then a record whose start time differs
        for record in (str(bystander.pid), json.dumps({**process_record(bystander.pid), "create_time": 1.0})):
            (home / PID_FILE).write_text(record)
            proc = _ppd("ui", "--stop", "--root", tmp_path)
            assert proc.returncode == 0 and "nothing signalled" in proc.stdout, proc.stdout
            assert bystander.poll() is None and not (home / PID_FILE).exists()
        # the process the record describes is stopped
        (home / PID_FILE).write_text(json.dumps(process_record(bystander.pid)))
        proc = _ppd("ui", "--stop", "--root", tmp_path)
        assert f"stopped the Prefect server (pid {bystander.pid})" in proc.stdout
        assert bystander.wait(timeout=20) is not None
    finally:
        bystander.kill()
        bystander.wait()

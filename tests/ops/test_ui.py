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

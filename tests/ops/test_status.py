"""`ppd status` against a real Prefect server: it reflects the run just made, cached or not, and a
failed flow run retried in place recomputes only the stage that failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ppd_core.layout import RunLayout
from ppd_core.manifest import is_complete
from tests.ops.conftest import REPO, TINY_WORLD

PREFECT = str(Path(sys.executable).parent / "prefect")


def _stages(status: dict) -> dict[str, dict]:
    return {s["name"]: s for s in status["stages"]}


def test_status_reflects_the_run_just_made(ppd_json, prefect_server, tmp_path):
    root = tmp_path / "run"
    run = ppd_json("run", "--root", root, "--stages", "fewshot", *TINY_WORLD)
    status = ppd_json("status", "--root", root)
    assert status["api"] == prefect_server and status["root"] == str(root)
    stages = _stages(status)
    assert (
        list(stages) == [s["name"] for s in run["stages"]] == ["synthesize", "ingest", "relabel", "fewshot"]
    )
    for made in run["stages"]:
        shown = stages[made["name"]]
        assert shown["state"] == "Completed" and not shown["cached"] and shown["start"]
        assert shown["counts"] == made["counts"] and shown["counts_from"] == "result"
        assert shown["output_dir"] == made["output_dir"] and shown["seconds"] is not None
    assert status["flow_runs"][0]["flow"] == "ppd-pipeline" and status["flow_runs"][0]["state"] == "Completed"

    ppd_json("run", "--root", root, "--stages", "fewshot", *TINY_WORLD)  # everything cached now
    again = _stages(ppd_json("status", "--root", root))
    assert all(s["cached"] and s["state"] == "Cached" for s in again.values())
    assert all(again[n]["counts"] == stages[n]["counts"] for n in stages)
    assert {s["flow_run_id"] for s in again.values()} != {s["flow_run_id"] for s in stages.values()}


BUILD_CLIP = """
import sys
from pathlib import Path
from ppd_core.config import load_config
from ppd_core.embed.clip import build_tiny_open_clip
build_tiny_open_clip(Path(sys.argv[1]), load_config(None, [], environ={}).tiny_models)
"""


def _manifest_times(root: Path, stages) -> dict[str, int]:
    return {s: (RunLayout(root).stage_dirs(s)[0] / "manifest.json").stat().st_mtime_ns for s in stages}


def _status_in_process(api_url: str, root: Path) -> dict:
    """What `ppd status --json` reports, computed here (the same code, without a CLI start-up)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.status import collect_status

    results = root / ".prefect" / "results"
    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}):
        return collect_status(root)


def test_retried_flow_run_recomputes_only_the_failed_stage(ppd, api, prefect_server, server_env, tmp_path):
    """embed reads an open_clip model from a directory the user has not filled yet: the flow run
    fails at embed. Once the model is there, `prefect flow-run retry` runs the *same* flow run
    again: synthesize, ingest and fewshot come from cache, embed alone is computed."""
    root, model, staged = tmp_path / "run", tmp_path / "clip", tmp_path / "staging" / "clip"
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILD_CLIP, str(staged)], cwd=REPO
    )  # the fix, prepared aside
    embedder = f'[{{name: clip, kind: clip_diff, model: "local-dir:{model}"}}]'
    args = ["--root", root, "--stages", "embed", *TINY_WORLD, "--set", f"embed.embedders={embedder}"]
    failed = ppd("run", *args, "--set", "embed.default=clip", "--set", "embed.device=cpu", check=False)
    assert failed.returncode == 2 and "not an open_clip model directory" in failed.stderr
    # other flows on this server (backfill, partitions) take other parameters
    (flow_run,) = [
        r
        for r in api.read_flow_runs()
        if r.parameters.get("config", {}).get("run", {}).get("root") == str(root)
    ]
    assert flow_run.state.is_failed()
    upstream = ("synthesize", "ingest", "relabel", "fewshot")
    written = _manifest_times(root, upstream)

    assert builder.wait(timeout=300) == 0
    staged.rename(model)  # the user fixes the input
    env = {**server_env, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / ".prefect" / "results")}
    retry = subprocess.run(
        [PREFECT, "flow-run", "retry", str(flow_run.id), "--entrypoint", "flows/pipeline.py:pipeline_flow"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]

    after = _status_in_process(prefect_server, root)
    assert [r["id"] for r in after["flow_runs"]] == [str(flow_run.id)]  # the same flow run, not a new one
    assert after["flow_runs"][0]["state"] == "Completed"
    assert after["flow_runs"][0]["run_count"] == flow_run.run_count + 1  # one more attempt of that run
    stages = _stages(after)
    assert [n for n, s in stages.items() if not s["cached"]] == ["embed"]
    assert list(stages) == [*upstream, "embed"] and stages["embed"]["state"] == "Completed"
    assert stages["embed"]["counts"]["shot_sets"] > 0 and is_complete(stages["embed"]["output_dir"])
    assert _manifest_times(root, upstream) == written  # upstream outputs untouched


@pytest.mark.slow  # ~50 s on 2 cores: a run killed mid-flow, then status
def test_a_killed_run_is_shown_crashed_not_running(tmp_path):
    """`ppd run` killed with SIGKILL (its whole process group, the embedded API included) mid-flow: the next
    `ppd status` marks the flow run and its unfinished stage Crashed in Prefect and shows them so."""
    import json
    import os
    import signal
    import time

    from tests.ops.conftest import PPD

    root = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    slow = [*TINY_WORLD, "--set", "encoder.steps=100000"]  # the encoder stage runs until killed
    run = subprocess.Popen(
        [PPD, "run", "--root", str(root), "--stages", "encoder", *slow],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(root.glob("encoder/.*.partial")):  # the encoder stage is running
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.2)
        assert list((root / ".prefect" / "flow_runs").glob("*.json"))  # the process recorded itself
        time.sleep(2)  # task run states reach the API as events, a moment after the task starts
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()

    proc = subprocess.run(
        [PPD, "status", "--root", str(root), "--json"], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout)  # read back from Prefect after the dead run was marked there
    assert shown["flow_runs"][0]["state"] == "Crashed"
    stages = {s["name"]: s["state"] for s in shown["stages"]}
    assert stages["encoder"] == "Crashed" and stages["ingest"] == "Completed"
    assert not list((root / ".prefect" / "flow_runs").glob("*.json"))  # the record is done with

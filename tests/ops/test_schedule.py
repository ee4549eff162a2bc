"""Deployments of deploy/prefect.yaml on a real Prefect server: their cron schedules produce
scheduled flow runs, and `ppd serve` registers them and the GPU concurrency limit."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
)
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.serve import build_deployments, deployment_specs, schedules_of
from ppd_core import pipeline
from ppd_core.config import load_config
from tests.ops.conftest import PPD, REPO, TINY_WORLD

NAMES = ["ingest-embed", "retrain-evaluate"]


def _scheduled_runs(api, deployment_ids: list, minimum: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = api.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=deployment_ids))
        )
        per_deployment = {d: [r for r in runs if r.deployment_id == d] for d in deployment_ids}
        if all(len(v) >= minimum for v in per_deployment.values()) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_deploy_file_defines_valid_scheduled_deployments():
    cfg = load_config(None, [], environ={})
    specs = deployment_specs()
    assert [s["name"] for s in specs] == NAMES
    for spec in specs:
        pipeline.expand(spec["parameters"]["stages"], cfg)  # every stage name exists
        assert spec["parameters"]["partitioned"] is True  # the days' partitions, as ppd backfill writes them
        assert [s.cron for s in schedules_of(spec)] and spec[
            "entrypoint"
        ] == "flows/pipeline.py:pipeline_flow"


def test_cron_schedules_produce_scheduled_runs(api, prefect_server, tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}"], environ={})
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        ids = [d.apply() for d in build_deployments(cfg)]
    try:
        runs = _scheduled_runs(api, ids, minimum=3)
        by_deployment = {d: [r for r in runs if r.deployment_id == d] for d in ids}
        hourly, weekly = by_deployment[ids[0]], by_deployment[ids[1]]
        assert len(hourly) >= 3 and len(weekly) >= 3
        assert all(r.state_name == "Scheduled" for r in runs)
        assert all(r.expected_start_time.minute == 0 for r in hourly)
        assert all(
            (t.weekday(), t.hour, t.minute) == (6, 3, 0) for t in (r.expected_start_time for r in weekly)
        )
        assert hourly[0].parameters["stages"] == ["ingest", "fewshot", "embed"]
        assert hourly[0].parameters["config"]["run"]["root"] == str(tmp_path)
    finally:
        for deployment_id in ids:
            api.delete_deployment(deployment_id)


def test_ppd_serve_registers_the_deployments_and_the_gpu_limit(api, server_env, tmp_path):
    with contextlib.suppress(ObjectNotFound):  # so that ppd serve has to create it
        api.delete_concurrency_limit_by_tag("gpu")
    root = tmp_path / "served"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [PPD, "serve", "--root", str(root), *TINY_WORLD], cwd=REPO, env=server_env, stdout=out, stderr=out
        )
    try:
        deadline, deployments = time.monotonic() + 120, []
        while len(deployments) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            found = api.read_deployments(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=NAMES))
            )
            deployments = [d for d in found if d.parameters["config"]["run"]["root"] == str(root)]
        assert len(deployments) == 2, Path(log).read_text()[-3000:]
        assert api.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        assert all(d.schedules and d.schedules[0].active for d in deployments)
        assert all(d.parameters["config"]["world"]["num_users"] == 8 for d in deployments)  # --set reached it
        assert _scheduled_runs(api, [d.id for d in deployments], minimum=1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

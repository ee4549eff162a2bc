"""What every stage task shares: the fingerprint cache policy and the call into ppd_core.

Prefect's default cache policy includes the flow-run id and never hits across runs. Ours keys a
task on the stage fingerprint (config section + upstream manifest digests + code version), the same
name as its output directory, so Prefect and ppd_core agree on what is cached. The flow passes
``refresh_cache=True`` when that directory is missing or fails :func:`ppd_core.manifest.verify`.

Retries are for transient failures only: :func:`retry_if_transient` refuses to retry a
:class:`~ppd_core.errors.PPDError` (bad input, a config the model refuses, a failed training worker),
which would fail the same way again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy

from ppd_core import pipeline
from ppd_core.config import PPDConfig
from ppd_core.errors import PPDError, StageError
from ppd_core.manifest import load_manifest


@dataclass
class StageFingerprint(CachePolicy):
    """Cache key = ``ppd-<stage>-<fingerprint>``; the task's ``plan`` argument carries both."""

    def compute_key(
        self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs
    ) -> str | None:
        return f"ppd-{inputs['plan'].stage}-{inputs['plan'].fingerprint}"


STAGE_CACHE = StageFingerprint()


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is one of ours (a deterministic error)."""
    try:
        state.result()
    except PPDError:
        return False
    except Exception:
        return True
    return True


TASK_OPTIONS: dict[str, Any] = dict(
    cache_policy=STAGE_CACHE,
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_if_transient,
)


def progress_reporter(description: str, every: float = 0.02):
    """A ``(done, total)`` callback that publishes a Prefect progress artifact, throttled."""
    artifact_id = create_progress_artifact(0.0, description=description)
    state = {"last": 0.0}

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct - state["last"] >= 100 * every or done >= total:
            state["last"] = pct
            update_progress_artifact(artifact_id, pct)

    return report


def upstream_manifests(plan: pipeline.StagePlan, upstream_dirs: dict[str, str]) -> dict:
    """The manifests of the upstream outputs ``plan`` was made from, which must still be the complete ones."""
    manifests = {}
    for name, directory in upstream_dirs.items():
        m = load_manifest(directory)
        if m is None:
            raise StageError(f"upstream {name} output at {directory} is not complete")
        if plan.upstream.get(name) != m.digest:
            raise StageError(f"{plan.stage}: the {name} output changed after {plan.stage} was planned")
        manifests[name] = m
    return manifests


def outcome_summary(plan: pipeline.StagePlan, outcome, seconds: float) -> dict[str, Any]:
    """A stage outcome as the small JSON-able summary a task returns (persisted as its result)."""
    return {
        "stage": plan.stage,
        "directory": str(outcome.directory),
        "fingerprint": outcome.manifest.fingerprint,
        "digest": outcome.manifest.digest,
        "counts": outcome.manifest.counts,
        "reused": outcome.reused,
        "seconds": round(seconds, 3),
    }


def run_stage_body(
    config: PPDConfig,
    plan: pipeline.StagePlan,
    upstream_dirs: dict[str, str],
    progress=None,
    map_fn=None,
) -> dict[str, Any]:
    """Execute one planned stage; returns its :func:`outcome_summary`. The plan was made once, by the flow;
    the upstream outputs it was made from must still be the complete ones."""
    manifests = upstream_manifests(plan, upstream_dirs)
    t0 = time.perf_counter()
    # a second run on the root waits here while another process computes this output, then reuses it
    on_wait = get_run_logger().info
    outcome = pipeline.execute(config, plan, manifests, progress=progress, map_fn=map_fn, on_wait=on_wait)
    return outcome_summary(plan, outcome, time.perf_counter() - t0)


def run_joint_body(
    config: PPDConfig, plans: list[pipeline.StagePlan], upstream_dirs: dict[str, str], progress=None
) -> list[dict[str, Any]]:
    """Execute planned stages that share a joint body together (:func:`ppd_core.pipeline.execute_joint`);
    returns each one's :func:`outcome_summary`, in the order of ``plans``."""
    manifests = upstream_manifests(plans[0], upstream_dirs)
    for p in plans[1:]:
        upstream_manifests(p, upstream_dirs)
    t0 = time.perf_counter()
    outcomes = pipeline.execute_joint(
        config, plans, manifests, progress=progress, on_wait=get_run_logger().info
    )
    seconds = time.perf_counter() - t0
    return [outcome_summary(p, outcomes[p.stage], seconds) for p in plans]

"""The pipeline flow: every registered stage that the requested ones need, in pipeline order (synthesize ->
ingest -> tiny_models -> relabel -> fewshot -> encoder -> embed -> probe -> pretrain -> cache_latents ->
train_* -> evaluate), each one cached Prefect task built from the stage registry.

A stage is a cache hit when Prefect holds a record for its fingerprint *and* its output directory
verifies against its manifest; a missing or tampered directory forces a refresh of that stage only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.runs import record_flow_process
from ppd_core import pipeline
from ppd_core.config import PPDConfig
from ppd_core.data import partitions
from ppd_core.manifest import is_complete, load_manifest
from tasks.partition import ingest_partitions
from tasks.stage import task_for


# no flow-level retries: each stage task retries its own transient failures, and a rerun of the flow
# resumes from the stages that completed (every stage is cached)
@flow(name="ppd-pipeline", validate_parameters=True)
def pipeline_flow(
    config: PPDConfig, stages: list[str] | None = None, partitioned: bool | None = None
) -> list[dict[str, Any]]:
    """Run the requested stages (default: the whole pipeline) and whatever upstream they need, for one config.

    ``partitioned`` overrides ``config.ingest.partitioned`` (the scheduled deployments set it): the
    window's missing or failed days are ingested first, one ``ingest_partition`` task each, and the
    ``ingest`` stage is their union."""
    logger = get_run_logger()
    if partitioned is not None:
        config = config.model_copy(
            update={"ingest": config.ingest.model_copy(update={"partitioned": partitioned})}
        )
    record_flow_process(config.run.root)  # a later command can tell when this process is gone
    dirs: dict[str, str] = {}
    report: list[dict[str, Any]] = []
    for stage in pipeline.expand(stages, config):
        upstream_dirs = {u: dirs[u] for u in pipeline.upstream_of(stage, config)}
        days = None
        if stage == "ingest" and config.ingest.partitioned:
            days = _ingest_days(config, dirs)
            logger.info("partitions: %d day(s), %d ingested now", days["days"], len(days["computed"]))
        manifests = {u: load_manifest(d) for u, d in upstream_dirs.items()}
        p = pipeline.plan(config, stage, manifests)
        fresh = is_complete(p.directory)
        started = time.time()
        t0 = time.perf_counter()
        state = task_for(stage).with_options(refresh_cache=not fresh)(
            config, p, upstream_dirs, return_state=True
        )
        if not state.is_completed():
            # the flow ends in the stage's own failed state: its error reaches the caller once, without
            # the traceback Prefect logs for an exception raised in the flow body
            return state
        result = state.result()
        cached = state.name == "Cached" or bool(result.get("reused"))
        seconds = round(time.perf_counter() - t0, 3)
        brief = pipeline.stage(stage).describe(result["counts"])
        logger.info(
            "%s: %s in %.1fs%s",
            stage,
            "cached" if cached else "computed",
            seconds,
            f", {brief}" if brief else "",
        )
        dirs[stage] = result["directory"]
        report.append(
            {
                "name": stage,
                "output_dir": result["directory"],
                "fingerprint": result["fingerprint"],
                "cached": cached,
                "started": round(started, 3),
                "seconds": seconds,
                "counts": result["counts"],
                **({"partitions": days} if days is not None else {}),
            }
        )
    return report


def _ingest_days(config: PPDConfig, dirs: dict[str, str]) -> dict[str, Any]:
    """A partitioned run's first step: plan the window's days, run those missing or failed; a failed day
    stops the run (the days that succeeded stay complete for the next one)."""
    t0 = time.perf_counter()
    plans = partitions.plan_window(config, {u: Path(d) for u, d in dirs.items()})
    summary = partitions.run_summary(plans, ingest_partitions(config, plans))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if summary["failed"]:
        raise partitions.failed_days(config.run.root, plans, summary["failed"])
    return summary

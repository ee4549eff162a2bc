"""The pipeline flow: every registered stage that the requested ones need, in pipeline order (synthesize ->
ingest -> tiny_models -> relabel -> fewshot -> encoder -> embed -> probe -> pretrain -> cache_latents ->
train_* -> evaluate), each one cached Prefect task built from the stage registry. Stages that share a joint
body (``Stage.joint``: the train stages) and are due together run as one task (one DeepSpeed launch,
:func:`ppd_core.pipeline.execute_joint`); each still has its own output, line in the report and summary.

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
from tasks.stage import joint_task_for, task_for


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
    for group in pipeline.joint_groups(config, pipeline.expand(stages, config)):
        upstream_dirs = {u: dirs[u] for u in pipeline.upstream_of(group[0], config)}
        days = None
        if group[0] == "ingest" and config.ingest.partitioned:
            days = _ingest_days(config, dirs)
            logger.info("partitions: %d day(s), %d ingested now", days["days"], len(days["computed"]))
        manifests = {u: load_manifest(d) for u, d in upstream_dirs.items()}
        plans = [pipeline.plan(config, stage, manifests) for stage in group]
        # a complete output goes through its own (cached) task; the due ones of a joint group through one task
        due = [p for p in plans if not is_complete(p.directory)] if len(group) > 1 else []
        runs = [[p] for p in plans if p not in due] + ([due] if len(due) > 1 else [[p] for p in due])
        entries = {}
        for run in runs:
            started = time.time()
            t0 = time.perf_counter()
            if len(run) == 1:
                state = task_for(run[0].stage).with_options(refresh_cache=not is_complete(run[0].directory))(
                    config, run[0], upstream_dirs, return_state=True
                )
            else:
                state = joint_task_for([p.stage for p in run])(config, run, upstream_dirs, return_state=True)
            if not state.is_completed():
                # the flow ends in the stage's own failed state: its error reaches the caller once, without
                # the traceback Prefect logs for an exception raised in the flow body
                return state
            results = state.result()
            seconds = round(time.perf_counter() - t0, 3)
            for p, result in zip(run, results if len(run) > 1 else [results], strict=True):
                cached = (state.name == "Cached" and len(run) == 1) or bool(result.get("reused"))
                entries[p.stage] = _entry(p.stage, result, cached, started, seconds, [q.stage for q in run])
        for stage in group:  # one line per stage, in pipeline order
            entry = entries[stage]
            if days is not None:
                entry["partitions"] = days
            brief = pipeline.stage(stage).describe(entry["counts"])
            together = entry.get("joint_with", [])
            logger.info(
                "%s: %s in %.1fs%s%s",
                stage,
                "cached" if entry["cached"] else "computed",
                entry["seconds"],
                f", {brief}" if brief else "",
                f" (one launch with {', '.join(together)})" if together else "",
            )
            dirs[stage] = entry["output_dir"]
            report.append(entry)
    return report


def _entry(
    stage: str, result: dict, cached: bool, started: float, seconds: float, run: list[str]
) -> dict[str, Any]:
    """A stage's line of the flow's report; ``run``: the stages its task built together (seconds shared)."""
    together = [s for s in run if s != stage]
    return {
        "name": stage,
        "output_dir": result["directory"],
        "fingerprint": result["fingerprint"],
        "cached": cached,
        "started": round(started, 3),
        "seconds": seconds,
        "counts": result["counts"],
        **({"joint_with": together} if together and not result.get("reused") else {}),
    }


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

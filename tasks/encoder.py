"""Prefect task: the few-shot preference encoder (features, basis, training), with a progress artifact."""

from __future__ import annotations

from prefect import task

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, counts_artifact, progress_reporter, run_stage_body


@task(name="encoder", tags=["ppd", "embed"], **TASK_OPTIONS)
def encoder_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(
        config, stage, fingerprint, upstream_dirs, progress=progress_reporter("encoder training steps")
    )
    keys = ("train_users", "validation_users", "train_pairs", "best_step", "val_pair_accuracy", "seconds")
    counts_artifact(result, keys, "ppd-encoder-summary", "Few-shot preference encoder")
    return result

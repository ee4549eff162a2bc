"""Prefect tasks: toy pretraining, the latent/text cache, and the three trainers.

Training runs as a launcher subprocess in its own process group (ppd_core.train.launch): a cancelled
or crashed flow kills every rank, and a retry resumes from the newest complete checkpoint because
the stage's partial directory survives. The ``gpu`` tag lets a Prefect tag concurrency limit
(`prefect concurrency-limit create gpu 1`) serialise GPU stages.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from ppd_core.config import PPDConfig
from tasks.common import TASK_OPTIONS, progress_reporter, run_stage_body


@task(name="pretrain", tags=["ppd", "train", "gpu"], **TASK_OPTIONS)
def pretrain_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(
        config, stage, fingerprint, upstream_dirs, progress=progress_reporter("pretrain steps")
    )
    c = result["counts"]
    create_markdown_artifact(
        f"**Toy backbone pretrained** `{result['directory']}`: {c.get('steps')} steps, final loss "
        f"{c.get('final_loss')}, caption colour accuracy {c.get('colour_accuracy')}.",
        key="ppd-pretrain",
    )
    return result


@task(name="cache_latents", tags=["ppd", "train", "gpu"], **TASK_OPTIONS)
def cache_latents_task(
    config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]
) -> dict:
    return run_stage_body(
        config, stage, fingerprint, upstream_dirs, progress=progress_reporter("cached images and captions")
    )


@task(name="train", tags=["ppd", "train", "gpu"], **TASK_OPTIONS)
def train_task(config: PPDConfig, stage: str, fingerprint: str, upstream_dirs: dict[str, str]) -> dict:
    result = run_stage_body(
        config, stage, fingerprint, upstream_dirs, progress=progress_reporter(f"{stage} steps")
    )
    c = result["counts"]
    create_markdown_artifact(
        f"**{stage}** `{result['directory']}`: {c.get('steps')} steps, held-out implicit accuracy "
        f"{c.get('heldout_implicit_acc')}, {c.get('mean_step_s')} s/step. Adapter export: "
        f"`{result['directory']}/export/`.",
        key=f"ppd-{stage.replace('_', '-')}",
    )
    return result

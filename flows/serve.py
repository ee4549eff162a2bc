"""``ppd serve``: the deployments of ``deploy/prefect.yaml`` run on their cron schedules by one process.

``deploy/prefect.yaml`` is the one definition of the deployments (``prefect deploy`` registers the
same entries on a work pool). This module reads its ``deployments:`` entries and builds each with
``flow.to_deployment(...)``: the entrypoint's flow, its cron schedules, tags, description and
concurrency limit, and its ``parameters`` with ``config`` replaced by the config ``ppd serve``
resolved (preset, ``--set``, ``--root``). ``prefect.serve`` then runs them: the server's scheduler
creates the flow runs, this process executes them. Before serving, the ``gpu`` tag concurrency
limit (one slot) is created when missing, so training tasks (tag ``gpu``) never share a GPU.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from ppd_core.config import PPDConfig
from ppd_core.errors import ConfigError

DEPLOY_FILE = Path(__file__).resolve().parents[1] / "deploy" / "prefect.yaml"
GPU_TAG = "gpu"
GPU_SLOTS = 1


def deployment_specs(path: Path = DEPLOY_FILE) -> list[dict[str, Any]]:
    """The ``deployments:`` entries of a prefect.yaml."""
    try:
        specs = yaml.safe_load(Path(path).read_text()).get("deployments") or []
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot read its deployments ({e})") from e
    return specs


def load_entrypoint(entrypoint: str):
    """``flows/pipeline.py:pipeline_flow`` (or ``flows.pipeline:pipeline_flow``) -> the flow object."""
    module_path, _, name = entrypoint.partition(":")
    module = module_path.removesuffix(".py").replace("/", ".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"deployment entrypoint {entrypoint!r} cannot be loaded ({e})") from e


def schedules_of(spec: dict[str, Any]) -> list:
    return [
        Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
        for s in spec.get("schedules") or []
        if "cron" in s
    ]


def build_deployments(config: PPDConfig, specs: list[dict[str, Any]] | None = None) -> list:
    """One RunnerDeployment per spec, its ``config`` parameter replaced by ``config``."""
    deployments = []
    for spec in deployment_specs() if specs is None else specs:
        flow = load_entrypoint(spec["entrypoint"])
        parameters = {**(spec.get("parameters") or {}), "config": config.model_dump(mode="json")}
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                schedules=schedules_of(spec),
                parameters=parameters,
                tags=spec.get("tags"),
                description=spec.get("description"),
                concurrency_limit=spec.get("concurrency_limit"),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def ensure_gpu_limit(tag: str = GPU_TAG, slots: int = GPU_SLOTS) -> bool:
    """Create the tag concurrency limit when missing (``prefect concurrency-limit create gpu 1``); True if created."""
    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(tag)
            return False
        except ObjectNotFound:
            client.create_concurrency_limit(tag=tag, concurrency_limit=slots)
            return True


def serve(config: PPDConfig) -> None:
    """Create the GPU limit, then serve every deployment until interrupted."""
    from prefect import serve as prefect_serve

    ensure_gpu_limit()
    prefect_serve(*build_deployments(config))

"""The task runners a fanned-out stage maps its shards over (``run.task_runner``).

- ``threads``: Prefect's :class:`~prefect.task_runners.ThreadPoolTaskRunner` in the ``ppd`` process.
- ``dask``: :class:`prefect_dask.DaskTaskRunner` (the ``dask`` install extra), Prefect's own runner for Dask,
  so every shard stays a Prefect task run (state, retries, the dashboard) wherever it computes. Without
  ``run.cluster_address`` it starts a :class:`distributed.LocalCluster` of ``workers`` single-threaded
  worker processes for the stage and pins each to its own device (:mod:`ppd_core.devices`: worker ``i`` ->
  ``cuda:i``, or ``cpu`` with its share of the cores); with an address it joins that cluster, whose
  workers keep the devices they were started with (``dask cuda worker``: one worker per GPU, each
  seeing its own GPU first). Worker processes report to the same Prefect API as the ``ppd`` process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from ppd_core import devices
from ppd_core.config import RunConfig
from ppd_core.errors import InputError


@dataclass(frozen=True)
class PinSpec:
    """How a worker of a local cluster finds its device: its rank among ``workers``, and the visible devices
    (None: ask torch in the worker; a list: given, as the tests do with a fake one)."""

    workers: int
    visible: tuple[str, ...] | None = None


def pin_this_worker(spec: PinSpec) -> str | None:
    """In a Dask worker of a local cluster (named by its rank 0..n-1): pin this process to the device of its
    rank, once. Returns the device (None outside a Dask worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    if devices.pinned_device() is None:
        rank = int(worker.name)
        visible = list(spec.visible) if spec.visible is not None else devices.visible_devices()
        devices.pin(devices.device_for_worker(rank, visible), spec.workers)
    return devices.pinned_device()


def _api_env() -> dict[str, str]:
    """What a worker process needs to report to this process's Prefect API and result storage."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH

    env = {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value())}
    url = PREFECT_API_URL.value()
    if not url:  # Prefect's temporary server of this process
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        url = server.api_url if server.running else None
    if url:
        env["PREFECT_API_URL"] = url
    return env


def task_runner(
    run: RunConfig, workers: int, visible: tuple[str, ...] | None = None
) -> tuple[TaskRunner, PinSpec | None]:
    """The task runner of ``run.task_runner`` for ``workers`` shards at once, and the pinning its workers do."""
    if run.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers), None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise InputError(
            "run.task_runner=dask needs the dask extra: pip install -e '.[dask]' (prefect-dask, dask, distributed)"
        ) from None
    if run.cluster_address:
        return DaskTaskRunner(address=run.cluster_address), None
    logging.getLogger("distributed").setLevel(logging.WARNING)  # no INFO line per worker start and stop
    env = {
        **_api_env(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "DASK_LOGGING__DISTRIBUTED": "warning",
    }
    cluster = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "env": env,
    }
    return DaskTaskRunner(cluster_kwargs=cluster), PinSpec(workers, visible)

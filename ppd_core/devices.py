"""Which device a shard worker computes on: one device per worker.

A stage that fans out (``Stage.workers``) may run its shards in several worker processes (the ``dask`` task
runner, ``run.task_runner``). Each worker is pinned to its own device at start-up: worker rank ``i`` of ``n``
gets the ``i``-th visible device (``cuda:i``; round-robin when there are more workers than GPUs; ``cpu``
when there is no GPU), and every model the worker loads with ``device: auto`` goes there
(:func:`ppd_core.weights.resolve_device` asks :func:`pinned_device`). A device named explicitly in the config
(``cuda:1``, ``cpu``) is used as given. On a CPU-only worker the pin also divides the cores among the workers,
so two workers do not each start a thread per core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

_PINNED: str | None = None


def visible_devices() -> list[str]:
    """The devices this process can use: ``cuda:0 .. cuda:k-1`` when CUDA is available, else ``["cpu"]``."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def device_for_worker(rank: int, visible: Sequence[str]) -> str:
    """The device of worker ``rank``: the ``rank``-th visible device, round-robin; ``cpu`` without any."""
    if rank < 0:
        raise ValueError(f"worker rank must be >= 0, got {rank}")
    return visible[rank % len(visible)] if visible else "cpu"


def assign_devices(workers: int, visible: Sequence[str]) -> list[str]:
    """One device per worker rank ``0 .. workers-1`` (:func:`device_for_worker`)."""
    return [device_for_worker(rank, visible) for rank in range(workers)]


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """Torch threads of one CPU worker when ``workers`` share the machine's cores (at least 1)."""
    return max(1, (cpus or os.cpu_count() or 1) // max(1, workers))


def pin(device: str, workers: int = 1) -> None:
    """Pin this process (a shard worker) to ``device``; a CPU worker also takes its share of the cores."""
    global _PINNED
    _PINNED = device
    if device == "cpu":
        import torch

        torch.set_num_threads(threads_per_worker(workers))


def pinned_device() -> str | None:
    """The device this process was pinned to (None: not a pinned worker)."""
    return _PINNED

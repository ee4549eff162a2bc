"""Training checkpoints: DeepSpeed engine state + per-rank RNG + step, a completion marker written
last, rotation, and ``resume: latest``.

Layout: ``<run>/checkpoints/step-00000100/`` holds DeepSpeed's files (model states, one optimizer
file per rank under ZeRO-1/2), ``rng-rank<r>.pt`` for every rank and, once every rank has saved,
``_COMPLETE``. A directory without the marker (a run killed mid-save) is never resumed from and is
removed by the next rotation.

The RNG files hold only tensors and plain Python values (:func:`encode_rng`), so they load with
``torch.load(..., weights_only=True)``: no pickled object of the file is ever executed. A file of the
earlier pickled format cannot be read that way; resuming from it is a :class:`StageError` that says how
to start over, never an unsafe load.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ppd_core.errors import StageError
from ppd_core.manifest import atomic_write_bytes

COMPLETE = "_COMPLETE"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for d in ckpt_dir.glob("step-*"):
        if d.is_dir() and (d / COMPLETE).is_file():
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    return sorted(found)


def latest(ckpt_dir: Path) -> tuple[int, Path] | None:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RNG_FORMAT = 2


def _encode_state(state):
    """Numpy arrays -> tensors (int64 for unsigned words), tuples -> tagged lists; the rest as is."""
    if isinstance(state, np.ndarray):
        return {"__ndarray__": torch.from_numpy(state.astype(np.int64)), "dtype": str(state.dtype)}
    if isinstance(state, tuple):
        return {"__tuple__": [_encode_state(v) for v in state]}
    if isinstance(state, list):
        return [_encode_state(v) for v in state]
    if isinstance(state, dict):
        return {k: _encode_state(v) for k, v in state.items()}
    return state


def _decode_state(state):
    if isinstance(state, dict) and "__ndarray__" in state:
        return state["__ndarray__"].numpy().astype(state["dtype"])
    if isinstance(state, dict) and "__tuple__" in state:
        return tuple(_decode_state(v) for v in state["__tuple__"])
    if isinstance(state, list):
        return [_decode_state(v) for v in state]
    if isinstance(state, dict):
        return {k: _decode_state(v) for k, v in state.items()}
    return state


def encode_rng(rng: dict) -> dict:
    """RNG states (as :func:`capture_rng` returns them) as tensors and plain values only."""
    return {"format": RNG_FORMAT, "state": _encode_state(rng)}


def decode_rng(data: dict) -> dict:
    return _decode_state(data["state"])


def read_rng(path: Path) -> dict:
    """The RNG states saved in ``path``, loaded with ``weights_only=True``."""
    import pickle

    try:
        data = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise StageError(
            f"{path} was written in an older format that cannot be loaded safely ({str(e).splitlines()[0]}); "
            f"to start this training over, remove {path.parent.parent} or set train.resume=never"
        ) from None
    if not isinstance(data, dict) or data.get("format") != RNG_FORMAT:
        raise StageError(f"{path}: not an RNG state file of format {RNG_FORMAT}")
    return decode_rng(data)


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    rank: int,
    barrier: Callable[[], None],
    keep: int,
    extra_rng: dict | None = None,
) -> Path:
    """Every rank calls this at the same step; rank 0 writes the marker after all ranks saved, then rotates."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    rng = {"global": capture_rng(), **(extra_rng or {})}
    buf = _to_bytes(encode_rng(rng))
    atomic_write_bytes(ckpt_dir / tag / f"rng-rank{rank}.pt", buf)
    barrier()
    if rank == 0:
        atomic_write_bytes(ckpt_dir / tag / COMPLETE, f"{step}\n".encode())
        rotate(ckpt_dir, keep)
    barrier()
    return ckpt_dir / tag


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and any incomplete directory
    older than the newest complete one."""
    done = complete_checkpoints(ckpt_dir)
    newest = done[-1][0] if done else -1
    for _, d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in ckpt_dir.glob("step-*"):
        if d.is_dir() and not (d / COMPLETE).exists():
            try:
                step = int(d.name.split("-", 1)[1])
            except ValueError:
                continue
            if step < newest:
                shutil.rmtree(d, ignore_errors=True)


def load(engine, ckpt_dir: Path, rank: int) -> tuple[int, dict] | None:
    """Restore the newest complete checkpoint into ``engine``; returns (step, rng dict) or None."""
    found = latest(ckpt_dir)
    if found is None:
        return None
    step, d = found
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=d.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None or client.get("step") != step:
        raise RuntimeError(f"checkpoint {d} did not load (client state {client!r})")
    return step, read_rng(d / f"rng-rank{rank}.pt")


def _to_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()

"""The `train_<trainer>` stage body: write the run spec, launch the ranks, collect the summary.

The stage directory is the run directory: ``train_spec.json``, ``launch.log``, ``metrics.jsonl``,
``validation.jsonl``, ``tensorboard/``, ``checkpoints/step-*/`` (rotated, ``_COMPLETE`` marker),
``export/`` (adapter safetensors, user_embeddings.parquet, model card) and ``summary.json``. The
partial directory survives a crash, so re-running the stage resumes from the newest complete
checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ppd_core.config import PPDConfig
from ppd_core.manifest import atomic_write_json
from ppd_core.train import launch


def train_stage(
    cfg: PPDConfig, trainer: str, dirs: dict[str, Path], out_dir: Path, embedder: str | None = None
) -> dict:
    """Launch the ranks for ``trainer`` conditioned on ``embedder`` (default: ``cfg.embed.default``)."""
    spec = {
        "config": cfg.model_dump(mode="json"),
        "trainer": trainer,
        "embedder": embedder or cfg.embed.default,
        "run_dir": str(out_dir),
        "dirs": {k: str(v) for k, v in dirs.items()},
    }
    spec_path = out_dir / "train_spec.json"
    atomic_write_json(spec_path, spec)
    t = cfg.train
    cmd = launch.build_command(
        t.launcher, "ppd_core.train.worker", ["--spec", str(spec_path)], t.num_gpus, t.hostfile
    )
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu") if not _has_cuda() else "cuda"}
    launch.run(cmd, out_dir / "launch.log", env=env)
    summary = json.loads((out_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k != "heldout_curve"}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

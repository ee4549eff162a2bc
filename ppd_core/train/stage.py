"""The `train_<trainer>` stage body: write the run spec, launch the ranks, collect the summary.

The stage directory is the run directory: ``train_spec.json``, ``launch.log``, ``metrics.jsonl``,
``validation.jsonl``, ``tensorboard/``, ``checkpoints/step-*/`` (rotated, ``_COMPLETE`` marker),
``export/`` (adapter safetensors, user_embeddings.parquet, model card) and ``summary.json``. The
partial directory survives a crash, so re-running the stage resumes from the newest complete
checkpoint; every rank holds ``<run>.ranks.lock`` (beside the run directory) shared while it runs, and a
new launch waits until no earlier rank holds it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

from ppd_core.config import PPDConfig
from ppd_core.manifest import atomic_write_json
from ppd_core.train import launch


class _MetricsWatcher(threading.Thread):
    """Reports the last logged step of ``metrics.jsonl`` to ``progress(step, steps)`` while the ranks run."""

    def __init__(self, path: Path, steps: int, progress, every_s: float = 2.0):
        super().__init__(daemon=True)
        self.path, self.steps, self.progress, self.every_s = path, steps, progress, every_s
        self.done = threading.Event()

    def last_step(self) -> int:
        try:
            lines = self.path.read_text().splitlines()
            return int(json.loads(lines[-1])["step"]) if lines else 0
        except (OSError, ValueError, KeyError, IndexError):
            return 0  # not written yet, or a line being written

    def report(self) -> None:
        try:
            self.progress(self.last_step(), self.steps)
        except Exception as e:  # a progress display must never stop training
            logging.getLogger(__name__).warning("training progress report failed: %s", e)

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.report()
        self.report()


def train_stage(
    cfg: PPDConfig,
    trainer: str,
    dirs: dict[str, Path],
    out_dir: Path,
    embedder: str | None = None,
    progress=None,
) -> dict:
    """Launch the ranks for ``trainer`` conditioned on ``embedder`` (default: ``cfg.embed.default``);
    ``progress(step, steps)`` is called every few seconds from the rank-0 metrics log."""
    return train_stages(cfg, [(trainer, embedder, out_dir)], dirs, progress)[0]


def train_stages(
    cfg: PPDConfig, runs: list[tuple[str, str | None, Path]], dirs: dict[str, Path], progress=None
):
    """Train several runs ``(trainer, embedder, out_dir)`` in one launch: the ranks load the backbone and
    latent cache once and train every run on the same batches (:mod:`ppd_core.train.worker`), each
    bit-for-bit as it would train alone. Every run directory gets the spec, the launch log and its own
    results; returns each run's counts. ``progress(step, steps)`` follows the first run's metrics log."""
    out_dirs = [Path(out) for _, _, out in runs]
    locks = [launch.ranks_lock_path(out) for out in out_dirs]
    for lock in locks:
        # ranks of an earlier launch (whose ppd was killed) must be gone before anything here is written again
        launch.wait_for_ranks(lock, on_wait=lambda message: print(message, file=sys.stderr, flush=True))
    spec = {
        "config": cfg.model_dump(mode="json"),
        "dirs": {k: str(v) for k, v in dirs.items()},
        "runs": [
            {
                "trainer": trainer,
                "embedder": embedder or cfg.embed.default,
                "run_dir": str(out),
                "ranks_lock": str(lock),
            }
            for (trainer, embedder, out), lock in zip(runs, locks, strict=True)
        ],
    }
    if len(runs) == 1:  # a launch of one run keeps its flat spec
        spec = {k: v for k, v in spec.items() if k != "runs"} | spec["runs"][0]
    for out in out_dirs:
        atomic_write_json(out / "train_spec.json", spec)
    t = cfg.train
    first = out_dirs[0]
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu") if not _has_cuda() else "cuda"}
    watcher = _MetricsWatcher(first / "metrics.jsonl", t.steps, progress) if progress else None
    if watcher:
        watcher.start()
    try:
        launch.launch_ranks(
            t.launcher,
            "ppd_core.train.worker",
            ["--spec", str(first / "train_spec.json")],
            first / "launch.log",
            t.num_gpus,
            t.hostfile,
            env=env,
            on_retry=logging.getLogger(__name__).warning,
        )
    finally:
        if watcher:
            watcher.done.set()
            watcher.join(10)
        for out in out_dirs[1:]:  # the shared launch log, in every run directory
            if (first / "launch.log").exists():
                shutil.copyfile(first / "launch.log", out / "launch.log")
    counts = []
    for out in out_dirs:
        summary = json.loads((out / "summary.json").read_text())
        counts.append({k: v for k, v in summary.items() if k != "heldout_curve"})
    return counts


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

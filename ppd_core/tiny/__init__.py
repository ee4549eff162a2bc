"""The `tiny_models` stage: the offline default VLM, open_clip model and reward models, built once per run root.

Random weights from small configs (no download), saved with ``save_pretrained`` / open_clip's
local-dir layout and later loaded back through the same ``from_pretrained`` /
``create_model_and_transforms`` path a real checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path

from ppd_core.config import TinyModelsConfig
from ppd_core.data.world_render import CAPTIONS
from ppd_core.stage import Progress, ProgressCount


def build_tiny_models(cfg: TinyModelsConfig, out_dir: Path, progress: Progress | None = None) -> dict:
    """Build the three offline model families under ``out_dir``; ``progress(done, 3)`` after each."""
    from ppd_core.embed.clip import build_tiny_open_clip
    from ppd_core.tiny.rewards import build_tiny_rewards
    from ppd_core.tiny.vlm import build_tiny_vlm

    built = ProgressCount(progress, 3)
    build_tiny_vlm(out_dir / "vlm", cfg, corpus=CAPTIONS)
    built.add()
    build_tiny_open_clip(out_dir / "open_clip", cfg)
    built.add()
    build_tiny_rewards(out_dir / "rewards", cfg)
    built.add()
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return {"models": ["vlm", "open_clip", "rewards"], "files": len(files)}

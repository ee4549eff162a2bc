"""Image grids for validation and reports: rows x columns of equally sized images in one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, rows: int, cols: int, scale: int = 1) -> np.ndarray:
    """uint8 (rows * cols, H, W, 3), row-major -> uint8 (rows * H * scale, cols * W * scale, 3), nearest upscale."""
    n, h, w, _ = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows} x {cols} grid")
    out = images.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    return out.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else out


def save_grid(images: np.ndarray, rows: int, cols: int, path: str | Path, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid(images, rows, cols, scale)).save(tmp)
    tmp.replace(path)
    return path

"""Stable Cascade's EfficientNet encoder: images -> the Stage-C prior's training latents (x0).

The prior (Stage C) was trained on latents of this encoder, not of a VAE; diffusers does not ship it.
What follows is Stability-AI/StableCascade as its ``train/train_c.py`` uses it (the paper):

- **Module** (``modules/effnet.py``, ``EfficientNetEncoder``): torchvision ``efficientnet_v2_s().features``
  (1280 channels, stride 32) as ``backbone``, then ``mapper`` = ``Conv2d(1280, 16, 1, bias=False)`` +
  ``BatchNorm2d(16, affine=False)``, the BatchNorm's running statistics normalising the latents to about
  mean 0, std 1. State-dict keys: ``backbone.<torchvision features keys>`` and ``mapper.0.weight``,
  ``mapper.1.running_mean`` / ``running_var`` / ``num_batches_tracked`` (ComfyUI recognises the file by
  ``backbone.1.0.block.0.1.num_batches_tracked``).
- **Weights**: ``effnet_encoder.safetensors`` (~82 MB, float32), at the root of the hub repo
  ``stabilityai/stable-cascade`` (also ``stabilityai/StableWurst``, which the StableCascade repo's
  ``models/download_models.sh`` fetches); train_c.py reads it from ``effnet_checkpoint_path``.
- **Preprocessing**: train_c.py's data transform is ``ToTensor`` ([0, 1]), ``Resize(image_size, bilinear,
  antialias)``, a square crop; ``effnet_preprocess`` is ImageNet ``Normalize`` only
  (mean 0.485/0.456/0.406, std 0.229/0.224/0.225). :func:`effnet_preprocess` does the same with a centre
  crop (train_c.py's ``SmartCrop`` is a randomised training augmentation).
- **Resolution**: latent side = effnet input side / 32. Stage C trains at ``image_size`` 768 -> 24 x 24,
  the latent side the prior samples at 1024 px (ceil(1024 / 42.67) = 24). So the encoder sees
  ``32 * latent side`` pixels: 768 for the 1024 px backbone (ComfyUI's StableCascade_StageC_VAEEncode
  likewise resizes to ``(side // 42) * 32``).
- **Scaling**: none. ``encode_latents`` returns ``effnet(effnet_preprocess(images))`` as is (no Wuerstchen
  ``(x + 1) / 42``), in float32: train_c.py keeps the encoder in float32 and outside bf16 autocast.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from ppd_core.errors import StageError
from ppd_core.models.sd import _to_unit_images

EFFNET_FILE = "effnet_encoder.safetensors"
EFFNET_HUB = f"stabilityai/stable-cascade/{EFFNET_FILE}"  # hub repo / path in the repo
DOWNSCALE = 32  # efficientnet_v2_s features: stride 32
LATENT_CHANNELS = 16
FEATURE_CHANNELS = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    """Stable Cascade's Stage-C encoder (the ``modules/effnet.py`` layout): normalised images
    (B, 3, R, R) -> latents (B, 16, R/32, R/32). Built without weights (torchvision ``weights=None``)."""

    def __init__(self, c_latent: int = LATENT_CHANNELS) -> None:
        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s(weights=None).features
        self.mapper = nn.Sequential(
            nn.Conv2d(FEATURE_CHANNELS, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),  # running stats: latents of about mean 0, std 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))  # (B, 3, R, R) -> (B, 1280, R/32, R/32) -> (B, 16, ...)


def effnet_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> float32 (B, 3, size, size): centre crop,
    bilinear antialiased resize, ImageNet normalisation (train_c.py's transform + ``effnet_preprocess``)."""
    x = _to_unit_images(images, size)  # (B, 3, size, size) in [0, 1]
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def default_effnet(model: str | Path) -> str:
    """Where the encoder comes from when the config names none: ``effnet_encoder.safetensors`` inside a local
    model directory when there is one (the tiny test checkpoint carries its own), else :data:`EFFNET_HUB`."""
    local = Path(model) / EFFNET_FILE
    return str(local) if local.is_file() else EFFNET_HUB


def resolve_effnet_file(source: str | Path) -> Path:
    """A local safetensors file, a local directory holding :data:`EFFNET_FILE`, or ``"owner/repo/path/in/repo"``
    (downloaded through ``huggingface_hub.hf_hub_download``, cached) -> the local file."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / EFFNET_FILE
    if path.is_file():
        return path
    text = str(source)
    parts = text.split("/")
    if path.is_absolute() or text.startswith((".", "~")) or len(parts) < 3 or not all(parts):
        raise StageError(
            f"EfficientNet encoder {text!r}: no such file (give a local safetensors file or "
            f"'hub_repo/path/in/repo', e.g. {EFFNET_HUB!r})"
        )
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as e:  # offline, gated, missing file: one readable error
        raise StageError(
            f"EfficientNet encoder {text!r}: cannot fetch {filename} from the hub repo {repo_id} "
            f"({type(e).__name__}: {e})"
        ) from None


def load_effnet(
    source: str | Path = EFFNET_HUB,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> EfficientNetEncoder:
    """:func:`resolve_effnet_file`, then its state dict into :class:`EfficientNetEncoder` (every key must
    match; only ``num_batches_tracked`` may be absent) -> frozen, eval mode (running BatchNorm statistics,
    no stochastic depth), on ``device`` in ``dtype``."""
    path = resolve_effnet_file(source)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise StageError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    encoder = EfficientNetEncoder()
    result = encoder.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise StageError(
            f"{path}: not Stable Cascade's EfficientNet encoder (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def tiny_effnet(seed: int = 0, calibration_size: int = 96) -> EfficientNetEncoder:
    """A random encoder in the real architecture and key layout (the layout fixes the size: 20M
    parameters), in eval mode. torchvision's initialisation alone makes features of ~1e-6, so every
    BatchNorm's running statistics are fitted on one seeded batch of uniform-noise images at
    ``calibration_size`` px (stochastic depth off): latents of such images then have a std of a few units,
    near the real encoder's ~1 (other sizes and image statistics are further off: the weights are random)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = EfficientNetEncoder()
        noise = torch.rand(8, 3, calibration_size, calibration_size)  # (B, 3, R, R) in [0, 1]
    images = effnet_preprocess(noise, calibration_size)
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    encoder.train()
    for m in encoder.modules():
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.eval()
    with torch.no_grad():
        encoder(images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return encoder.eval().requires_grad_(False)


def save_tiny_effnet(path: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_effnet` as a safetensors file in the ``effnet_encoder.safetensors`` key layout
    (float32, ~82 MB). Same seed, same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tiny_effnet(seed).state_dict().items()}
    save_file(state, str(path))
    return path

"""One way to get a backbone from config: the toy model from its `pretrain` output, SD and Cascade
from a hub id or local directory through their real ``from_pretrained`` paths."""

from __future__ import annotations

from pathlib import Path

import torch

from ppd_core.config import BackboneConfig
from ppd_core.errors import ConfigError
from ppd_core.models.backbone import Backbone

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backbone(
    cfg: BackboneConfig, pretrain_dir: Path | None = None, device: str | torch.device = "cpu"
) -> Backbone:
    if cfg.kind == "toy":
        from ppd_core.models.toy import ToyBackbone

        source = Path(cfg.model) if cfg.model else (pretrain_dir / "backbone" if pretrain_dir else None)
        if source is None:
            raise ConfigError("backbone.kind=toy needs the pretrain stage's output (or backbone.model=<dir>)")
        return ToyBackbone.load(source, device=device, dtype=DTYPES[cfg.dtype])
    if cfg.model is None:
        raise ConfigError(f"backbone.kind={cfg.kind} needs backbone.model (a hub id or a local directory)")
    if cfg.kind == "sd":
        from ppd_core.models.sd import SDBackbone

        return SDBackbone(cfg, device=device)
    from ppd_core.models.cascade import CascadeBackbone

    return CascadeBackbone.from_config(cfg, device=device)

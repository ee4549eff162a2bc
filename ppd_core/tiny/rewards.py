"""The tiny offline reward weights: random, seeded, saved in the formats of the real checkpoints.

Written by the tiny_models stage under ``<tiny_models>/rewards/`` and read by
:func:`ppd_core.rewards.scorers.load_reward` through the loaders real weights take::

    rewards/pickscore/model/         HF CLIPModel (save_pretrained: config.json, model.safetensors)
    rewards/pickscore/processor/     CLIPProcessor (offline CLIP tokenizer + image processor)
    rewards/clip_score/model/        HF CLIPModel and its processor in one dir, like openai/clip-vit-*
    rewards/hps/arch/                open_clip architecture (open_clip_config.json, no weights)
    rewards/hps/HPS_tiny_compressed.pt       {"state_dict": ...} like HPS_v2*_compressed.pt
    rewards/aesthetic/aesthetic-mlp.pth      MLP state dict with the released key names (layers.0 ... layers.7)
    rewards/aesthetic/clip/          open_clip model (local-dir layout) standing in for ViT-L/14
    rewards/<kind>/reward.json       {"model", "processor", "sha256"}: paths relative to the kind's dir,
                                     and the weight file's sha256, checked at every load

Same config -> byte-identical files. The caller's torch RNG is untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ppd_core.config import TinyModelsConfig
from ppd_core.embed.clip import WEIGHTS_FILE, build_tiny_open_clip
from ppd_core.manifest import staged_directory
from ppd_core.rewards.scorers import TINY_RECORD, AestheticMLP
from ppd_core.weights import weight_file_sha256

HF_WIDTH = 32  # tiny HF CLIP: 2 layers of width 32, 2 heads, patch 8
HF_LAYERS = 2
HF_HEADS = 2
HF_PATCH = 8
MLP_WIDTHS = (16, 8, 4, 2)  # tiny aesthetic MLP hidden widths (released: 1024, 128, 64, 16)
SEED_OFFSET = {"pickscore": 1, "clip_score": 2, "hps": 3, "aesthetic": 4}  # distinct weights per kind


def _record(kind_dir: Path, model: str, processor: str | None, weights: str) -> None:
    record = {"model": model, "processor": processor, "sha256": weight_file_sha256(kind_dir / weights)}
    (kind_dir / TINY_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _seeded(cfg: TinyModelsConfig, kind: str) -> TinyModelsConfig:
    return cfg.model_copy(update={"seed": cfg.seed + SEED_OFFSET[kind]})


def _tiny_hf_clip(cfg: TinyModelsConfig, seed: int):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from ppd_core.models.text import BOS_ID, CLIP_MAX_LENGTH, EOS_ID, VOCAB_SIZE

    common = {
        "hidden_size": HF_WIDTH,
        "intermediate_size": 2 * HF_WIDTH,
        "num_hidden_layers": HF_LAYERS,
        "num_attention_heads": HF_HEADS,
        "projection_dim": cfg.clip_embed_dim,
    }
    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # != 2: pooled at the first <|endoftext|>, as CLIP's own tokenizer ends texts
        pad_token_id=EOS_ID,
        **common,
    )
    vision = CLIPVisionConfig(image_size=cfg.clip_image_size, patch_size=HF_PATCH, **common)
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.clip_embed_dim
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config).eval()


def _build_processor(cfg: TinyModelsConfig, out_dir: Path) -> None:
    """CLIPProcessor: the offline CLIP tokenizer + CLIP's image processor at the tiny size (shortest side,
    centre crop), saved with save_pretrained (the tokenizer's vocab.json + merges.txt as well)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from ppd_core.models.text import build_offline_clip_tokenizer

    tokenizer = build_offline_clip_tokenizer(out_dir)
    size = cfg.clip_image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)


def _build_hf_clips(out: Path, cfg: TinyModelsConfig) -> None:
    """pickscore: model/ + processor/ (two sources, like PickScore_v1 + CLIP-H); clip_score: one dir
    holding both, like openai/clip-vit-*. The processor is built once and copied."""
    _build_processor(cfg, out / "pickscore" / "processor")
    for kind in ("pickscore", "clip_score"):
        _tiny_hf_clip(cfg, cfg.seed + SEED_OFFSET[kind]).save_pretrained(out / kind / "model")
    shutil.copytree(out / "pickscore" / "processor", out / "clip_score" / "model", dirs_exist_ok=True)
    _record(out / "pickscore", "model", "processor", "model/model.safetensors")
    _record(out / "clip_score", "model", None, "model/model.safetensors")


def _build_hps(out: Path, cfg: TinyModelsConfig) -> None:
    """The tiny open_clip architecture without weights + its weights as an HPS-style checkpoint."""
    kind_dir = out / "hps"
    arch = build_tiny_open_clip(kind_dir / "arch", _seeded(cfg, "hps"))
    state = load_file(arch / WEIGHTS_FILE)
    (arch / WEIGHTS_FILE).unlink()  # the architecture dir must not carry weights of its own
    torch.save({"state_dict": state}, kind_dir / "HPS_tiny_compressed.pt")
    _record(kind_dir, "HPS_tiny_compressed.pt", "arch", "HPS_tiny_compressed.pt")


def _build_aesthetic(out: Path, cfg: TinyModelsConfig) -> None:
    """A tiny open_clip model and an MLP on its embedding width, keys as the released .pth."""
    kind_dir = out / "aesthetic"
    build_tiny_open_clip(kind_dir / "clip", _seeded(cfg, "aesthetic"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + SEED_OFFSET["aesthetic"])
        mlp = AestheticMLP((cfg.clip_embed_dim, *MLP_WIDTHS))
    torch.save({k: v.contiguous() for k, v in mlp.state_dict().items()}, kind_dir / "aesthetic-mlp.pth")
    _record(kind_dir, "aesthetic-mlp.pth", "clip", "aesthetic-mlp.pth")


def build_tiny_rewards(out_dir: Path, cfg: TinyModelsConfig) -> Path:
    """Build every tiny reward into ``out_dir`` (staged beside it, then moved into place); return it."""
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        _build_hf_clips(staging, cfg)
        _build_hps(staging, cfg)
        _build_aesthetic(staging, cfg)
    return out_dir

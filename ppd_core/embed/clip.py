"""The CLIP-difference baseline embedder and the tiny offline open_clip model it defaults to.

A shot set's embedding is the mean over its K shots of ``normalize(f(preferred)) -
normalize(f(dispreferred))`` with ``f`` = open_clip ``encode_image`` behind the model's own
inference transform: the direction in CLIP space that the user's choices point to. On the toy
world a random tiny open_clip already recovers part of the archetype (the toy-world measurements).

The tiny default is built by open_clip's own factory from a config dict (no name registration,
no download), seeded, and saved in the layout open_clip loads with
``create_model_and_transforms("local-dir:" + dir)`` (the CPU measurements)::

    dir/open_clip_config.json       {"model_cfg": {...}, "preprocess_cfg": {mean, std, ...}}
    dir/open_clip_model.safetensors
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ppd_core.config import EmbedderSpec, TinyModelsConfig
from ppd_core.embed.base import Embedder, EmbedOutput, ShotSet
from ppd_core.errors import ConfigError
from ppd_core.manifest import staged_directory
from ppd_core.weights import files_digest

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# the files open_clip's local-dir loader looks for, in its order of preference
_CHECKPOINT_NAMES = (
    WEIGHTS_FILE,
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "model.pth",
)
_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# OpenAI CLIP normalisation, open_clip's default for its own models
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_model_cfg(cfg: TinyModelsConfig) -> dict:
    """open_clip ``model_cfg`` of the tiny default: ViT 2x64 (patch 8), text 2x64, CLIP's vocabulary."""
    return {
        "embed_dim": cfg.clip_embed_dim,
        "vision_cfg": {
            "image_size": cfg.clip_image_size,
            "layers": 2,
            "width": 64,
            "head_width": 32,  # 2 heads
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def build_tiny_open_clip(out_dir: Path, cfg: TinyModelsConfig) -> Path:
    """Build the seeded tiny open_clip model into ``out_dir``; return ``out_dir``.

    Built in a staging directory beside ``out_dir`` and moved into place (an existing ``out_dir`` is
    replaced), so a reader never sees half a model. Deterministic: the same ``cfg`` gives
    byte-identical files. The caller's torch RNG is untouched. open_clip logs that no weights were
    found: expected, the weights are being created here.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": tiny_model_cfg(cfg),
        "preprocess_cfg": {
            "size": cfg.clip_image_size,
            "mean": list(_MEAN),
            "std": list(_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    with staged_directory(out_dir) as staging:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # the factory builds the architecture from the config alone (no weights in the dir yet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.create_model(LOCAL_DIR + str(staging), device="cpu")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
    return out_dir


@dataclass(frozen=True)
class ClipSource:
    """Where an open_clip model comes from: the factory arguments and the identity they imply."""

    model_name: str  # first argument of open_clip.create_model_and_transforms
    pretrained: str | None  # tag or checkpoint file, only for schema-less names
    model_id: str
    weights_digest: str


def _local_weights(directory: Path) -> list[Path]:
    for name in _CHECKPOINT_NAMES:
        if (directory / name).is_file():
            return [directory / name]
    raise ConfigError(
        f"open_clip directory {directory} has {CONFIG_FILE} but no weights file ({WEIGHTS_FILE})"
    )


def resolve_clip_source(model: str | None, model_dir: Path | None) -> ClipSource:
    """Parse an ``EmbedderSpec.model`` string for open_clip.

    None: the tiny default in ``model_dir``; ``local-dir:DIR`` or a directory holding
    ``open_clip_config.json``: a saved model; ``hf-hub:org/repo``: a hub model; ``name`` or
    ``name:tag``: a built-in architecture with a pretrained tag (or checkpoint file). A bare
    ``name`` takes open_clip's first listed tag; an architecture without any tag is refused,
    since random weights are only meant for the tiny default.
    """
    if model is None and model_dir is None:
        raise ConfigError(
            "open_clip: no model given and no tiny default directory (run the tiny_models stage)"
        )
    if model is None or model.startswith(LOCAL_DIR) or Path(model).is_dir():
        directory = Path(model_dir if model is None else model.removeprefix(LOCAL_DIR)).resolve()
        if not (directory / CONFIG_FILE).is_file():
            raise ConfigError(f"{directory} is not an open_clip model directory (no {CONFIG_FILE})")
        return ClipSource(
            model_name=LOCAL_DIR + str(directory),
            pretrained=None,
            model_id=LOCAL_DIR + directory.name,
            weights_digest=files_digest(_local_weights(directory)),
        )
    if model.startswith(HF_HUB):
        # the hub revision is not pinned by open_clip: the id stands in for the weights
        return ClipSource(model, None, model, model)
    name, _, tag = model.partition(":")
    if name.replace("/", "-") not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            raise ConfigError(
                f"open_clip model {name!r} has no pretrained tag; give 'name:tag' or a directory"
            )
        tag = tags[0]
    digest = files_digest([tag]) if os.path.isfile(tag) else tag
    return ClipSource(name, tag, f"{name}:{tag}", digest)


class CLIPDiffEmbedder(Embedder):
    """mean_k [normalize(f(preferred_k)) - normalize(f(dispreferred_k))] over a set's shots: (embed_dim,)."""

    name = "clip-diff"

    def __init__(self, source: ClipSource, device: str | torch.device = "cpu", dtype: str = "float32"):
        if dtype not in _PRECISION:
            raise ConfigError(f"open_clip dtype must be one of {sorted(_PRECISION)}, got {dtype!r}")
        self.source = source
        self.device = torch.device(device)  # a concrete device; "auto" is resolved by the caller
        self.dtype = dtype
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            source.model_name, pretrained=source.pretrained, precision=_PRECISION[dtype], device=self.device
        )
        self.model = model.eval()
        size = model.visual.preprocess_cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self._dtype = next(self.model.parameters()).dtype
        with torch.no_grad():  # one blank image tells the feature width of any architecture
            blank = torch.zeros(1, 3, *self.image_size, device=self.device, dtype=self._dtype)
            self._embed_dim = int(self.model.encode_image(blank).shape[-1])

    @classmethod
    def from_spec(
        cls, spec: EmbedderSpec, model_dir: Path | None, device: str | torch.device = "cpu"
    ) -> CLIPDiffEmbedder:
        """``spec.model`` None means the tiny default saved in ``model_dir``."""
        return cls(resolve_clip_source(spec.model, model_dir), device=device, dtype=spec.dtype)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self._embed_dim,)

    def identity(self) -> dict:
        pp = self.model.visual.preprocess_cfg
        return {
            "kind": "clip_diff",
            "model_id": self.source.model_id,
            "weights_digest": self.source.weights_digest,
            "image_size": list(self.image_size),
            "preprocess": {k: list(pp[k]) if isinstance(pp[k], tuple) else pp[k] for k in sorted(pp)},
            "dtype": self.dtype,
        }

    @torch.no_grad()
    def embed(self, batch: Sequence[ShotSet]) -> EmbedOutput:
        if not batch:
            raise ValueError("embed() needs at least one shot set")
        counts = [len(s.shots) for s in batch]
        if min(counts) == 0:
            raise ValueError("every shot set needs at least one shot")
        # all 2K images of all sets in one forward: [set0 shot0 pref, set0 shot0 dispref, set0 shot1 pref, ...]
        images = [img for s in batch for shot in s.shots for img in (shot.preferred, shot.dispreferred)]
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)  # (2*sum K, 3, H, W)
        feats = F.normalize(self.model.encode_image(pixels.to(self._dtype)).float(), dim=-1)  # (2*sum K, D)
        diffs = feats[0::2] - feats[1::2]  # (sum K, D): preferred - dispreferred per shot
        means = [chunk.mean(dim=0) for chunk in torch.split(diffs, counts)]  # B x (D,)
        return EmbedOutput(embeddings=torch.stack(means).cpu().contiguous())

"""Frozen per-image features for the preference encoder: one named source, computed once per image.

A :class:`FeatureSource` turns images into one float32 vector each:

- ``vlm``: a transformers image-text-to-text model's *projected* image tokens (what its language model
  reads for the image; ``get_image_features``). The base image's token grid (side = vision image size /
  patch size) is average-pooled to ``grid x grid`` cells and flattened, so the vector keeps where things
  are; ``grid: 1`` is the plain mean over every token of the image.
- ``open_clip``: ``encode_image`` of an open_clip model (its own preprocessing).

:func:`write_feature_shards` computes the features of a list of image uids into Parquet shards
(``features/shard-00000.parquet``: image_uid, feature), each written atomically, so a killed stage
resumes at the first missing shard. :class:`FeatureTable` reads them back as one matrix with a uid index.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from ppd_core.config import FeatureSourceSpec
from ppd_core.errors import ConfigError, StageError

FEATURES_DIR = "features"
SHARD_IMAGES = 4096  # images per feature shard (a shard completes atomically)


class FeatureSource:
    """Images -> (N, dim) float32 features; ``identity()`` names the source exactly (weights digest included)."""

    dim: int

    def identity(self) -> dict:
        raise NotImplementedError

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError


class VLMImageFeatures(FeatureSource):
    """Projected image tokens of an image-text-to-text model, pooled to a ``grid x grid`` layout."""

    def __init__(self, model: str | Path, grid: int, dtype: str, device: torch.device):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ppd_core.embed.vlm import VLMEmbedder

        self.model_id, self.grid, self.dtype_name, self.device = str(model), int(grid), dtype, device
        # the embedder's weight digest rules (local safetensors, else the hub commit) name the weights
        self.weights_digest = VLMEmbedder(self.model_id, readout="prefill").weights_digest()
        self.processor = AutoProcessor.from_pretrained(self.model_id)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=getattr(torch, dtype))
            .to(device)
            .eval()
        )
        if not hasattr(self.model, "get_image_features"):
            raise ConfigError(f"{self.model_id}: the model has no get_image_features; use open_clip features")
        vision = self.model.config.vision_config
        self.side = int(vision.image_size) // int(vision.patch_size)  # base token grid side
        if self.grid > self.side:
            raise ConfigError(f"features.grid {self.grid} exceeds the model's token grid side {self.side}")
        hidden = int(self.model.config.get_text_config().hidden_size)
        self.dim = hidden * self.grid * self.grid

    def identity(self) -> dict:
        return {
            "kind": "vlm",
            "model_id": self.model_id,
            "weights_digest": self.weights_digest,
            "grid": self.grid,
            "dtype": self.dtype_name,
        }

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        inputs = self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        kwargs = {"pixel_values": inputs["pixel_values"].to(self.device, self.model.dtype)}
        if "image_sizes" in inputs:
            kwargs["image_sizes"] = inputs["image_sizes"].to(self.device)
        out = self.model.get_image_features(**kwargs)
        per_image = getattr(out, "pooler_output", None)
        if per_image is None:  # older layouts: a tensor (N, T, H) or a list of (T_i, H)
            per_image = out if isinstance(out, (list, tuple, torch.Tensor)) else out[0]
        cells = self.side * self.side
        pooled = []
        for tokens in per_image:  # (T_i, H): the base image's grid first (anyres packs the crops after it)
            if tokens.shape[0] < cells:
                raise StageError(
                    f"{self.model_id}: an image gave {tokens.shape[0]} tokens, fewer than its {self.side}x"
                    f"{self.side} base grid"
                )
            grid = tokens[:cells].float().T.reshape(1, -1, self.side, self.side)  # (1, H, side, side)
            pooled.append(F.adaptive_avg_pool2d(grid, self.grid).flatten())  # (H * grid * grid,)
        return torch.stack(pooled).cpu().numpy().astype(np.float32)


class OpenClipImageFeatures(FeatureSource):
    """open_clip ``encode_image`` (unnormalised) after the model's own preprocessing."""

    def __init__(self, model: str | None, model_dir: Path | None, dtype: str, device: torch.device):
        from ppd_core.config import EmbedderSpec
        from ppd_core.embed.clip import CLIPDiffEmbedder

        spec = EmbedderSpec(name="features", kind="clip_diff", model=model, dtype=dtype)
        self.clip = CLIPDiffEmbedder.from_spec(spec, model_dir, device)  # one open_clip loading path
        self.dim = int(self.clip.output_shape[0])

    def identity(self) -> dict:
        ident = self.clip.identity()
        return {**ident, "kind": "open_clip"}

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        clip = self.clip
        pixels = torch.stack([clip.preprocess(im.convert("RGB")) for im in images]).to(clip.device)
        return clip.model.encode_image(pixels.to(clip._dtype)).float().cpu().numpy().astype(np.float32)


def load_feature_source(spec: FeatureSourceSpec, tiny_models: Path | None, device: str) -> FeatureSource:
    """Build the source ``spec`` names; ``spec.model`` None means the tiny default under ``tiny_models``."""
    from ppd_core.weights import resolve_device

    dev = resolve_device(device)
    if spec.model is None and tiny_models is None:
        raise ConfigError("encoder.features names no model and no tiny default model was built")
    if spec.kind == "vlm":
        return VLMImageFeatures(spec.model or Path(tiny_models) / "vlm", spec.grid, spec.dtype, dev)
    return OpenClipImageFeatures(
        spec.model, Path(tiny_models) / "open_clip" if tiny_models else None, spec.dtype, dev
    )


def feature_schema(source: FeatureSource) -> pa.Schema:
    return pa.schema(
        [("image_uid", pa.string()), ("feature", pa.list_(pa.float32(), source.dim))],
        metadata={"feature_source": json.dumps(source.identity(), sort_keys=True), "dim": str(source.dim)},
    )


def _shard_ok(path: Path, schema: pa.Schema, uids: Sequence[str]) -> bool:
    try:
        got = pq.read_schema(path)
        return got.metadata == schema.metadata and pq.read_table(path, columns=["image_uid"]).column(
            0
        ).to_pylist() == list(uids)
    except (OSError, pa.ArrowException):
        return False


def write_feature_shards(
    source: FeatureSource,
    uids: Sequence[str],
    load_image: Callable[[str], Image.Image],
    out_dir: Path,
    batch_size: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Features of ``uids`` (sorted, unique) into ``out_dir/features/``; complete shards are kept."""
    schema = feature_schema(source)
    root = Path(out_dir) / FEATURES_DIR
    root.mkdir(parents=True, exist_ok=True)
    computed = resumed = 0
    for index, start in enumerate(range(0, len(uids), SHARD_IMAGES)):
        chunk = list(uids[start : start + SHARD_IMAGES])
        path = root / f"shard-{index:05d}.parquet"
        if _shard_ok(path, schema, chunk):
            resumed += len(chunk)
        else:
            parts = [
                source.features([load_image(u) for u in chunk[i : i + batch_size]])
                for i in range(0, len(chunk), batch_size)
            ]
            feats = np.concatenate(parts).astype(np.float32)  # (n, dim)
            table = pa.table(
                {
                    "image_uid": pa.array(chunk, pa.string()),
                    "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), source.dim),
                },
                schema=schema,
            )
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, path)
            computed += len(chunk)
        if progress:
            progress(start + len(chunk), len(uids))
    return {"images": len(uids), "computed": computed, "resumed": resumed, "dim": source.dim}


class FeatureTable:
    """The cached features of a stage output: ``matrix`` (N, dim) and ``index`` uid -> row."""

    def __init__(self, directory: Path):
        shards = sorted((Path(directory) / FEATURES_DIR).glob("shard-*.parquet"))
        if not shards:
            raise StageError(f"{directory}: no cached image features ({FEATURES_DIR}/shard-*.parquet)")
        table = pa.concat_tables([pq.read_table(s) for s in shards])
        meta = pq.read_schema(shards[0]).metadata
        self.source_identity = json.loads(meta[b"feature_source"])
        self.dim = int(meta[b"dim"])
        flat = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.matrix = flat.reshape(len(table), self.dim).astype(np.float32)
        self.index = {u: i for i, u in enumerate(table.column("image_uid").to_pylist())}

    def rows(self, uids: Sequence[str]) -> np.ndarray:
        """(len(uids),) row indices; raises for a uid that has no cached feature."""
        try:
            return np.fromiter((self.index[u] for u in uids), dtype=np.int64, count=len(uids))
        except KeyError as e:
            raise StageError(f"image {e.args[0]} has no cached feature") from None

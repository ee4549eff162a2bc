"""Pixels and truth of the synthetic world: what an image shows, how a style latent renders, how it
is measured, and the oracle (:class:`SyntheticWorld`) that scores any image from its pixels.

An image is one coloured shape on a plain tinted background. The caption names the content
("a red circle"); a hidden style latent ``z`` (one value per attribute, in population-std units)
sets what users care about:

=============  ========================================  ======================================
attribute      rendered as                               measured as (:func:`measure_attributes`)
=============  ========================================  ======================================
brightness     grey level of the background              luma of the median border pixel
warmth         red-versus-blue tint of the background    R - B of the median border pixel
saturation     HSV saturation of the object's colour     mean HSV saturation over the object
size           object area (fraction of the image)       object-mask fraction
position       horizontal centre of the object           object-mask centroid x, in [0, 1]
=============  ========================================  ======================================

The object's hue and shape always follow the caption, so content stays correct whatever the
style. Images are drawn at ``image_size * supersample`` and box-filtered down (anti-aliasing),
then stored as JPEG quality 95 with 4:4:4 chroma so colour survives at 16 px.
The measurement uses pixels only, so it scores generated (noisy, imperfect) images too.
The data-generating process (users, pairs, labels, quirks) lives in :mod:`ppd_core.data.synthetic`,
which re-exports this module's public names.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ppd_core.config import WorldConfig
from ppd_core.errors import StageError
from ppd_core.schemas import WORLD_USERS

ATTRIBUTES: tuple[str, ...] = ("brightness", "warmth", "saturation", "size", "position")
WORLD_VERSION = 1
WORLD_DIR = "world"  # ground truth inside a synthesize output: users.parquet, world.json

# Pure hues (max channel 1, min channel 0, so HSV saturation of the rendered colour is exactly s).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.6, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
}
# Shapes in unit coordinates, centred on their centroid and x-symmetric (so the mask centroid x
# is the placement x): inside(X, Y) -> bool, and the unit shape's area.
_CROSS_ARM = 0.35
SHAPES: dict[str, tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], float]] = {
    "circle": (lambda x, y: x * x + y * y <= 1.0, np.pi),
    "square": (lambda x, y: (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0), 4.0),
    "triangle": (
        lambda x, y: (y <= 2 / 3) & (y >= 2.0 * np.abs(x) - 4 / 3),
        2.0,
    ),  # apex up, base 2, height 2
    "diamond": (lambda x, y: np.abs(x) + np.abs(y) <= 1.0, 2.0),
    "cross": (
        lambda x, y: (
            ((np.abs(x) <= _CROSS_ARM) & (np.abs(y) <= 1.0))
            | ((np.abs(y) <= _CROSS_ARM) & (np.abs(x) <= 1.0))
        ),
        8 * _CROSS_ARM - 4 * _CROSS_ARM**2,
    ),
}


def world_dir(dirs: Mapping[str, str | Path]) -> Path | None:
    """The synthetic world's ground truth (``<synthesize>/world``) among stage directories, if any."""
    return Path(dirs["synthesize"]) / WORLD_DIR if "synthesize" in dirs else None


def _caption(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


_CONTENT: dict[str, tuple[str, str]] = {_caption(c, s): (c, s) for s in SHAPES for c in COLOURS}
CAPTIONS: tuple[str, ...] = tuple(_CONTENT)  # "a red circle", "an orange cross", ...

# Style latent -> rendering parameter: centre + scale * clip(z, -LATENT_LIMIT, LATENT_LIMIT).
# Ranges keep every object clearly distinct from its background (the mask needs contrast).
LATENT_LIMIT = 3.5
STYLE_RENDERING: dict[str, tuple[float, float]] = {
    "brightness": (0.43, 0.075),  # background grey level in [0, 1]
    "warmth": (0.0, 0.045),  # background (R, B) = level +- warmth
    "saturation": (0.65, 0.09),  # object HSV saturation
    "size": (0.15, 0.028),  # object area, fraction of the image
    "position": (0.5, 0.06),  # object centre x, fraction of the width
}
OBJECT_VALUE = 0.95  # HSV value of every object
JPEG_QUALITY = 95

# Object mask: soft weight rising from 0 to 1 as the RGB distance to the background colour goes
# from MASK_LOW to MASK_HIGH (0..255 units). JPEG noise at quality 95 stays well below MASK_LOW.
MASK_LOW = 12.0
MASK_HIGH = 36.0
_MEASURE_CHUNK = 256
_RENDER_CHUNK = 512  # images per vectorised chunk (bounds memory on large images)


def caption_content(caption: str) -> tuple[str, str]:
    """``"a red circle"`` -> ``("red", "circle")``."""
    try:
        return _CONTENT[caption]
    except KeyError:
        raise ValueError(f"{caption!r} is not a caption of the synthetic world") from None


def style_parameters(styles: np.ndarray) -> dict[str, np.ndarray]:
    """Style latents (N, A) -> rendering parameters, each (N,)."""
    z = np.clip(np.asarray(styles, dtype=np.float64), -LATENT_LIMIT, LATENT_LIMIT)
    return {
        name: centre + scale * z[:, i] for i, (name, (centre, scale)) in enumerate(STYLE_RENDERING.items())
    }


def render_images(
    captions: Sequence[str], styles: np.ndarray, image_size: int = 16, supersample: int = 4
) -> np.ndarray:
    """Draw one image per (caption, style latent) -> uint8 (N, image_size, image_size, 3).

    Vectorised: the shape is sampled on a ``supersample`` x finer grid and box-averaged, i.e. a
    supersampled render with a BOX downsample, without a per-image PIL round trip.
    """
    n = len(captions)
    styles = np.asarray(styles, dtype=np.float64).reshape(n, len(ATTRIBUTES))
    params = style_parameters(styles)
    level, warmth = params["brightness"], params["warmth"]
    background = np.clip(np.stack([level + warmth, level, level - warmth], axis=1), 0.0, 1.0)  # (N, 3)
    colours, shapes = zip(*(caption_content(c) for c in captions), strict=True) if n else ((), ())
    hue = np.array([COLOURS[c] for c in colours], dtype=np.float64).reshape(n, 3)
    fill = OBJECT_VALUE * (1.0 - params["saturation"][:, None] * (1.0 - hue))  # (N, 3)

    side = image_size * supersample
    grid = (np.arange(side, dtype=np.float64) + 0.5) / side  # sample centres, image-fraction units
    coverage = np.empty((n, image_size, image_size), dtype=np.float64)
    shape_names = np.array(shapes)
    for shape, (inside, unit_area) in SHAPES.items():
        members = np.flatnonzero(shape_names == shape)
        for start in range(0, len(members), _RENDER_CHUNK):
            idx = members[start : start + _RENDER_CHUNK]
            scale = np.sqrt(params["size"][idx] / unit_area)[:, None, None]  # unit shape -> image fraction
            x = (grid[None, None, :] - params["position"][idx][:, None, None]) / scale  # (n, 1, side)
            y = (grid[None, :, None] - 0.5) / scale  # (n, side, 1)
            hit = inside(x, y)  # (n, side, side)
            blocks = hit.reshape(len(idx), image_size, supersample, image_size, supersample)
            coverage[idx] = blocks.mean(axis=(2, 4))
    cov = coverage[..., None]  # (N, H, W, 1)
    pixels = background[:, None, None, :] * (1.0 - cov) + fill[:, None, None, :] * cov
    return np.rint(pixels * 255.0).astype(np.uint8)


def encode_jpeg(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> JPEG bytes (quality 95, 4:4:4 chroma; deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False
    )
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Image bytes (any PIL format) -> uint8 (H, W, 3) RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _measure_chunk(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)  # (N, H, W, 3), 0..255
    n, h, w, _ = x.shape
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # (N, 2W+2H-4, 3)
    background = np.median(border, axis=1)  # (N, 3): robust to an object touching the edge
    luma = background @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    warmth = background[:, 0] - background[:, 2]

    distance = np.linalg.norm(x - background[:, None, None, :], axis=-1)  # (N, H, W)
    weight = np.clip((distance - MASK_LOW) / (MASK_HIGH - MASK_LOW), 0.0, 1.0)
    mass = weight.sum(axis=(1, 2))  # (N,) object pixels (soft count)
    has_object = mass > 1e-6
    safe_mass = np.where(has_object, mass, 1.0)

    cmax, cmin = x.max(axis=-1), x.min(axis=-1)
    hsv_saturation = np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0)  # (N, H, W)
    saturation = np.where(has_object, (weight * hsv_saturation).sum(axis=(1, 2)) / safe_mass, 0.0)
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w
    position = np.where(has_object, (weight * xs).sum(axis=(1, 2)) / safe_mass, 0.5)
    size = mass / (h * w)
    return np.stack([luma, warmth, saturation, size, position], axis=1).astype(np.float64)


def measure_attributes(images: np.ndarray) -> np.ndarray:
    """Raw style attributes from pixels: uint8 (N, H, W, 3) of any size -> float64 (N, len(ATTRIBUTES)).

    Units: brightness luma and warmth R-B in 0..255 units, saturation in [0, 1], size as a
    fraction of the image, position as the centroid x in [0, 1] (0.5 when no object is found,
    saturation then 0). Finite on every input, blank images included.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got shape {images.shape}")
    if len(images) == 0:
        return np.zeros((0, len(ATTRIBUTES)), dtype=np.float64)
    chunks = [_measure_chunk(images[i : i + _MEASURE_CHUNK]) for i in range(0, len(images), _MEASURE_CHUNK)]
    return np.concatenate(chunks, axis=0)


# ------------------------------------------------------------------------------------------- oracle


class SyntheticWorld:
    """Ground truth of a synthesized world: scores any image from its pixels.

    ``z(images) = (measure_attributes(images) - mean) / std`` with the stored population stats;
    a user's oracle reward is ``weights_u . z``.
    """

    def __init__(
        self,
        user_ids: np.ndarray,
        user_archetype: np.ndarray,
        user_weights: np.ndarray,
        archetypes: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        config: WorldConfig,
    ) -> None:
        self._index = {int(u): i for i, u in enumerate(user_ids)}
        self._user_ids = tuple(int(u) for u in user_ids)
        self._archetype = np.asarray(user_archetype, dtype=np.int64)
        self._weights = np.asarray(user_weights, dtype=np.float64)  # (U, A), unit rows
        self.archetypes = np.asarray(archetypes, dtype=np.float32)  # (K, A) archetype weight vectors
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.config = config
        self.captions = CAPTIONS
        self.image_size = config.image_size

    @classmethod
    def load(cls, out_dir: str | Path) -> SyntheticWorld:
        """Read ``out_dir/world/`` written by :func:`synthesize`."""
        world_dir = Path(out_dir) / WORLD_DIR
        try:
            meta = json.loads((world_dir / "world.json").read_text())
            users = pq.read_table(world_dir / "users.parquet")
        except FileNotFoundError as e:
            raise StageError(f"no synthetic world under {world_dir}: {e}") from None
        if tuple(meta["attributes"]) != ATTRIBUTES or meta["version"] != WORLD_VERSION:
            raise StageError(
                f"{world_dir}: world version {meta['version']} / attributes {meta['attributes']} "
                f"do not match this code ({WORLD_VERSION} / {list(ATTRIBUTES)})"
            )
        weights = np.array(users.column("weights").to_pylist(), dtype=np.float64).reshape(-1, len(ATTRIBUTES))
        return cls(
            users.column("user_id").to_numpy(),
            users.column("archetype").to_numpy(),
            weights,
            np.array(meta["archetypes"]),
            np.array(meta["attribute_mean"]),
            np.array(meta["attribute_std"]),
            WorldConfig.model_validate(meta["config"]),
        )

    def save(self, world_dir: Path) -> None:
        """Write ``users.parquet`` and ``world.json`` into ``world_dir`` (what :meth:`load` reads)."""
        world_dir.mkdir(parents=True, exist_ok=True)
        order = np.argsort(self._user_ids)
        users = pa.table(
            {
                "user_id": np.array(self._user_ids, dtype=np.int64)[order],
                "archetype": self._archetype[order].astype(np.int32),
                "weights": [w.astype(np.float32) for w in self._weights[order]],
            },
            schema=WORLD_USERS,
        )
        pq.write_table(users, world_dir / "users.parquet", compression="snappy")
        meta = {
            "version": WORLD_VERSION,
            "attributes": list(ATTRIBUTES),
            "attribute_mean": self.mean.tolist(),
            "attribute_std": self.std.tolist(),
            "archetypes": self.archetypes.astype(np.float64).tolist(),
            "captions": list(CAPTIONS),
            "image_size": self.config.image_size,
            "supersample": self.config.supersample,
            "style_rendering": {k: list(v) for k, v in STYLE_RENDERING.items()},
            "latent_limit": LATENT_LIMIT,
            "config": self.config.model_dump(mode="json"),
        }
        (world_dir / "world.json").write_text(json.dumps(meta, indent=2) + "\n")

    @property
    def user_ids(self) -> tuple[int, ...]:
        return self._user_ids

    def _row(self, user_id: int) -> int:
        try:
            return self._index[int(user_id)]
        except KeyError:
            raise KeyError(f"user {user_id} is not in this synthetic world") from None

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """Raw measured attributes (N, A) -> z-scores in population-std units."""
        return (raw - self.mean) / self.std

    def attributes(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> z-scored attributes (N, A) float64, from pixels only."""
        return self.standardise(measure_attributes(images))

    def reward(self, user_id: int, images: np.ndarray) -> np.ndarray:
        """Oracle reward (N,) = weights_u . z(images)."""
        return self.attributes(images) @ self._weights[self._row(user_id)]

    def true_preference(self, user_id: int) -> np.ndarray:
        """The user's unit preference vector over ATTRIBUTES, float32 (A,)."""
        return self._weights[self._row(user_id)].astype(np.float32)

    def has_user(self, user_id: int) -> bool:
        """Whether the world drew this user (the relabel stage's reward users are not the world's)."""
        return int(user_id) in self._index

    def archetype(self, user_id: int) -> int:
        """The user's archetype index."""
        return int(self._archetype[self._row(user_id)])

    def shot_attribute_differences(self, winner_images: np.ndarray, loser_images: np.ndarray) -> np.ndarray:
        """z(winner) - z(loser) of every shot, float64 (K, A)."""
        return self.attributes(winner_images) - self.attributes(loser_images)

    def shot_attribute_difference(self, winner_images: np.ndarray, loser_images: np.ndarray) -> np.ndarray:
        """Mean over the shots of z(winner) - z(loser), float32 (A,): what a shot set shows, measured without
        error."""
        return self.shot_attribute_differences(winner_images, loser_images).mean(axis=0).astype(np.float32)

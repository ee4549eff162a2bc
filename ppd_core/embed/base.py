"""The one embedder interface: a batch of shot sets in, one embedding tensor per set (plus optional
profile text) out.

A shot set is K labelled pairs of one user (caption, preferred image, dispreferred image), in the
order the prompt shows them. Every embedder (the paper's VLM, the CLIP-difference baseline, the
synthetic world's references) implements :class:`Embedder`, so the extraction stage, the probe and
training never know which one produced a vector.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass(frozen=True)
class Shot:
    """One labelled pair: the user preferred ``preferred`` over ``dispreferred`` for ``caption``."""

    caption: str
    preferred: Image.Image
    dispreferred: Image.Image
    pair_id: str = ""
    preferred_uid: str = ""
    dispreferred_uid: str = ""


@dataclass(frozen=True)
class ShotSet:
    """K shots of one user; ``shot_set_id`` is the content hash of the ordered pair ids."""

    shot_set_id: str
    user_id: int
    shots: tuple[Shot, ...]
    split: str = "seen"

    @property
    def pair_ids(self) -> list[str]:
        return [s.pair_id for s in self.shots]


@dataclass
class EmbedOutput:
    """``embeddings``: float32 (B, *Embedder.output_shape) on CPU; ``profiles``: B strings or None."""

    embeddings: torch.Tensor
    profiles: list[str] | None = None
    extras: dict = field(default_factory=dict)


class Embedder(abc.ABC):
    """Shot sets -> user preference embeddings."""

    #: short name used in tables and file names (e.g. "vlm-image_diff", "clip-diff", "true-preference")
    name: str = "embedder"

    @property
    @abc.abstractmethod
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one embedding, e.g. (layers + 1, hidden) for the VLM read-outs."""

    @abc.abstractmethod
    def identity(self) -> dict:
        """JSON-able identity: at least ``model_id`` and ``weights_digest`` (sha256 of the weights) and the
        read-out settings; embeddings are reused only when the identity matches exactly."""

    @abc.abstractmethod
    def embed(self, batch: Sequence[ShotSet]) -> EmbedOutput:
        """Embed a batch of shot sets (any batch size >= 1)."""

"""The synthetic world's reference embedders: the answer and the limits of K pairs (toy runs only).

``TruePreferenceEmbedder`` returns the user's true unit preference vector, whatever the shots
show (the upper bound of any embedding). A user the world did not draw (a reward user of the
`relabel` stage, labelled by a reward rather than a preference vector) has no such vector; it gets
the unit-length attribute difference of its shots, the best the pixels tell. ``TrueAttributeDiffEmbedder`` returns the mean over
the shots of z(preferred) - z(dispreferred), the measured style attributes of the pixels: what
K pairs show, measured without error (the report's K-shot ceiling). ``TruePosteriorEmbedder``
returns the Bayes posterior mean of the user's preference vector given the K labelled pairs, under the world's
own prior (its archetypes plus the user noise) and its own Bradley-Terry likelihood: the best any Stage 1 that
learned the population perfectly could read from K pairs (the limit an amortised encoder aims at).

Their identities carry the sha256 of the world's ``world.json``, so vectors of one world are never
reused for another.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ppd_core.data.synthetic import preference_vectors
from ppd_core.data.world_render import ATTRIBUTES, WORLD_DIR, SyntheticWorld
from ppd_core.embed.base import Embedder, EmbedOutput, ShotSet

WORLD_FILE = "world.json"


def world_digest(world_dir: Path) -> str:
    """sha256 of ``world_dir/world.json`` (the world's stats, archetypes and generating config)."""
    return hashlib.sha256((Path(world_dir) / WORLD_FILE).read_bytes()).hexdigest()


def _digest_of(world: SyntheticWorld) -> str:
    """The digest the world's saved ``world.json`` has, for a world held only in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        world.save(Path(tmp))
        return world_digest(Path(tmp))


def _load(path: str | Path) -> tuple[SyntheticWorld, str]:
    """``path`` is the synthesize() output dir (holding ``world/``) or that ``world/`` dir itself."""
    path = Path(path)
    root = path.parent if (path / WORLD_FILE).is_file() else path
    world = SyntheticWorld.load(root)
    return world, world_digest(root / WORLD_DIR)


def _as_uint8(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)


class _WorldEmbedder(Embedder):
    kind = ""

    def __init__(self, world: SyntheticWorld, digest: str | None = None):
        self.world = world
        self.digest = digest or _digest_of(world)

    @classmethod
    def from_world_dir(cls, path: str | Path) -> _WorldEmbedder:
        world, digest = _load(path)
        return cls(world, digest)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (len(ATTRIBUTES),)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "model_id": f"synthetic-world:{self.kind}",
            "weights_digest": self.digest,
            "attributes": list(ATTRIBUTES),
        }

    def embed(self, batch: Sequence[ShotSet]) -> EmbedOutput:
        if not batch:
            raise ValueError("embed() needs at least one shot set")
        vectors = np.stack([self._vector(s) for s in batch]).astype(np.float32)  # (B, A)
        return EmbedOutput(embeddings=torch.from_numpy(vectors))

    def _vector(self, shot_set: ShotSet) -> np.ndarray:
        raise NotImplementedError


class TruePreferenceEmbedder(_WorldEmbedder):
    """The user's true unit preference vector over the world's attributes, (A,)."""

    name = "true-preference"
    kind = "true_preference"

    def _vector(self, shot_set: ShotSet) -> np.ndarray:
        if self.world.has_user(shot_set.user_id):
            return self.world.true_preference(shot_set.user_id)
        diff = self.world.shot_attribute_difference(*_shot_images(shot_set))  # a reward user: no true vector
        return diff / max(float(np.linalg.norm(diff)), 1e-9)


class TrueAttributeDiffEmbedder(_WorldEmbedder):
    """Mean over the shots of the z-scored attributes of preferred minus dispreferred pixels, (A,)."""

    name = "true-attribute-diff"
    kind = "true_attribute_diff"

    def _vector(self, shot_set: ShotSet) -> np.ndarray:
        return self.world.shot_attribute_difference(*_shot_images(shot_set))


class TruePosteriorEmbedder(_WorldEmbedder):
    """Posterior mean of the unit preference vector given the shots, (A,), by importance weighting a fixed,
    seeded draw of ``PRIOR_SAMPLES`` vectors from the world's prior with the shots' Bradley-Terry likelihood
    ``sigmoid(bt_scale * w . (z(preferred) - z(dispreferred)))``."""

    name = "true-posterior"
    kind = "true_posterior"
    PRIOR_SAMPLES = 20000
    PRIOR_SEED = 0

    def __init__(self, world: SyntheticWorld, digest: str | None = None):
        super().__init__(world, digest)
        rng = np.random.default_rng(self.PRIOR_SEED)
        assigned = rng.integers(0, len(world.archetypes), self.PRIOR_SAMPLES)
        noise = world.config.user_noise * rng.standard_normal((self.PRIOR_SAMPLES, world.archetypes.shape[1]))
        self.prior = preference_vectors(world.archetypes, assigned, noise)  # (M, A) unit vectors

    def identity(self) -> dict:
        return {**super().identity(), "prior_samples": self.PRIOR_SAMPLES, "prior_seed": self.PRIOR_SEED}

    def _vector(self, shot_set: ShotSet) -> np.ndarray:
        diffs = self.world.shot_attribute_differences(*_shot_images(shot_set))  # (K, A)
        log_lik = -np.logaddexp(0.0, -self.world.config.bt_scale * self.prior @ diffs.T).sum(axis=1)  # (M,)
        weights = np.exp(log_lik - log_lik.max())
        return (weights @ self.prior / weights.sum()).astype(np.float32)


def _shot_images(shot_set: ShotSet) -> tuple[np.ndarray, np.ndarray]:
    """The shots' preferred and dispreferred images, uint8 (K, H, W, 3) each."""
    if not shot_set.shots:
        raise ValueError(f"shot set {shot_set.shot_set_id} has no shots")
    winners = np.stack([_as_uint8(s.preferred) for s in shot_set.shots])
    losers = np.stack([_as_uint8(s.dispreferred) for s in shot_set.shots])
    return winners, losers


REFERENCE_EMBEDDERS = {
    cls.kind: cls for cls in (TruePreferenceEmbedder, TrueAttributeDiffEmbedder, TruePosteriorEmbedder)
}

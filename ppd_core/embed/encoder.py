"""The `encoder` embedder kind: a shot set's user vector z from the trained few-shot preference encoder.

Reads the `encoder` stage's output: the chosen weights and the feature cache. A shot image whose uid is in
the cache (every image of the run's few-shot tables) is not recomputed; any other image (a brand-new user's
``ppd generate --shots`` file) goes through the same frozen feature source the encoder was trained on.
A new user therefore gets z from their K pairs with no retraining.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ppd_core.config import FeatureSourceSpec
from ppd_core.embed.base import Embedder, EmbedOutput, ShotSet
from ppd_core.embed.encoder_model import WEIGHTS_FILE, PreferenceEncoder
from ppd_core.embed.features import FeatureTable, load_feature_source
from ppd_core.errors import InputError, StageError
from ppd_core.weights import files_digest


class EncoderEmbedder(Embedder):
    """Shot sets -> z (z_dim,), the mean of the encoder's output."""

    def __init__(
        self, encoder_dir: Path, tiny_models: Path | None, device: str = "cpu", name: str = "encoder"
    ):
        encoder_dir = Path(encoder_dir)
        if not (encoder_dir / WEIGHTS_FILE).is_file():
            raise StageError(f"{encoder_dir}: no trained encoder ({WEIGHTS_FILE}); run the encoder stage")
        self.name = name
        self.directory = encoder_dir
        self.device = device
        self.tiny_models = tiny_models
        self.model, self.extra = PreferenceEncoder.load(encoder_dir)
        self.digest = files_digest([encoder_dir / WEIGHTS_FILE])
        self.cache = FeatureTable(encoder_dir)
        self._source = None
        self._lock = threading.Lock()

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.model.z_dim,)

    def identity(self) -> dict:
        return {
            "kind": "encoder",
            "model_id": f"ppd-encoder:{self.digest[:16]}",
            "weights_digest": self.digest,
            "feature_source": self.extra.get("feature_source"),
            "z_dim": self.model.z_dim,
        }

    def _features(self, uids: Sequence[str], images: Sequence) -> np.ndarray:
        """(N, D) features: cached rows where the uid is known, the frozen source for the rest."""
        out = np.empty((len(uids), self.cache.dim), dtype=np.float32)
        missing = [i for i, u in enumerate(uids) if not u or u not in self.cache.index]
        known = [i for i in range(len(uids)) if i not in set(missing)]
        if known:
            out[known] = self.cache.matrix[self.cache.rows([uids[i] for i in known])]
        if missing:
            with self._lock:
                if self._source is None:
                    spec = FeatureSourceSpec.model_validate(self.extra["feature_spec"])
                    self._source = load_feature_source(spec, self.tiny_models, self.device)
                if self._source.identity() != self.extra.get("feature_source"):
                    raise InputError(
                        f"the feature source {self._source.identity()} is not the one the encoder was trained on "
                        f"({self.extra.get('feature_source')})"
                    )
            out[missing] = self._source.features([images[i] for i in missing])
        return out

    @torch.no_grad()
    def embed(self, batch: Sequence[ShotSet]) -> EmbedOutput:
        if not batch or min(len(s.shots) for s in batch) == 0:
            raise InputError("embed() needs at least one shot set, each with at least one shot")
        uids, images = [], []
        for s in batch:
            for shot in s.shots:
                uids += [shot.preferred_uid, shot.dispreferred_uid]
                images += [shot.preferred, shot.dispreferred]
        feats = torch.from_numpy(self._features(uids, images))  # (2 * sum K, D)
        k_max = max(len(s.shots) for s in batch)
        preferred = torch.zeros(len(batch), k_max, feats.shape[1])  # (B, K, D)
        dispreferred = torch.zeros_like(preferred)
        mask = torch.zeros(len(batch), k_max, dtype=torch.bool)
        row = 0
        for b, s in enumerate(batch):
            k = len(s.shots)
            preferred[b, :k], dispreferred[b, :k] = (
                feats[row : row + 2 * k : 2],
                feats[row + 1 : row + 2 * k : 2],
            )
            mask[b, :k] = True
            row += 2 * k
        mu, _ = self.model.encode(preferred, dispreferred, mask)
        return EmbedOutput(embeddings=mu.float().contiguous())

"""Pair diagnostics: how well a new user's K shots predict that user's *other* pairs.

The archetype probe asks whether embeddings cluster by taste; generation needs more: an embedding from
which the user's preferences over new images can be read. For every embedder this module scores the
held-out (evaluation) pairs of unseen users from each of their shot sets:

- ``encoder_head``: the preference encoder's own reward head, r(z, x) = z . g(x) (encoder embedders);
- ``bt_probe``: a low-rank Bradley-Terry probe fitted on seen users only: the user vector is a linear read
  of the standardised embedding, r = (A e + b) . g(x), trained on every seen training pair with the
  embedding of the shot set that conditions it (the pairing training uses);
- ``bt_population``: the same probe with one shared vector and no user at all (what population DPO sees).

Image features come from the encoder stage's cache. Accuracy counts (shot set, evaluation pair) pairings;
a zero margin counts half. On the synthetic world, ``true-attribute-diff`` is the 4-shot ceiling.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ppd_core.config import ProbeConfig
from ppd_core.data.fewshot import read_fewshot
from ppd_core.embed.bradley_terry import fit_bradley_terry, standardised_differences
from ppd_core.embed.encoder_model import WEIGHTS_FILE, PreferenceEncoder
from ppd_core.embed.extract import read_embeddings
from ppd_core.embed.features import FeatureTable
from ppd_core.embed.probe import features, single_thread

TASK = "pairs_unseen"
POPULATION = "(population)"


def _accuracy(margins: torch.Tensor) -> float:
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())


class PairData:
    """Feature rows of seen users' training pairs (with their conditioning set) and unseen users' evaluation
    pairs, read once for every embedder."""

    def __init__(self, fewshot_dir: Path, encoder_dir: Path):
        self.table = FeatureTable(encoder_dir)
        self.X = torch.from_numpy(self.table.matrix)  # (N_images, D)
        train = read_fewshot(fewshot_dir, "train_pairs").to_pylist()
        self.train_sets = [r["shot_set_id"] for r in train]
        self.train_pairs = torch.as_tensor(self._rows(train))  # (P, 2)
        evals = [r for r in read_fewshot(fewshot_dir, "eval_pairs").to_pylist() if r["split"] == "unseen"]
        by_user: dict[int, list[dict]] = {}
        for r in evals:
            by_user.setdefault(int(r["user_id"]), []).append(r)
        self.eval_by_user = {u: torch.as_tensor(self._rows(rows)) for u, rows in sorted(by_user.items())}

    def _rows(self, rows: list[dict]) -> np.ndarray:
        return np.stack(
            [
                self.table.rows([r["winner_uid"] for r in rows]),
                self.table.rows([r["loser_uid"] for r in rows]),
            ],
            1,
        ).reshape(-1, 2)


def _row(embedder: str, kind: str, method: str, accuracy: float, n: int, shots: int) -> dict:
    return {
        "embedder": embedder,
        "kind": kind,
        "task": TASK,
        "method": method,
        "k": shots,
        "accuracy": accuracy,
        "n_test": n,
        "n_classes": 2,
    }


def pair_diagnostics(
    cfg: ProbeConfig,
    embed_dir: Path,
    fewshot_dir: Path,
    encoder_dir: Path,
    embedders: dict[str, str],
    on_fit: Callable[[], None] | None = None,
) -> list[dict]:
    """PROBE rows (task ``pairs_unseen``) for the population model and each ``{embedder: kind}``;
    ``on_fit()`` after each of them (1 + len(embedders) calls)."""
    done = on_fit or (lambda: None)
    data = PairData(fewshot_dir, encoder_dir)
    first_set = read_fewshot(fewshot_dir, "shot_sets", columns=["pair_ids"]).column(0)[0]
    shots = len(first_set.as_py())  # K, the shots of every set
    X, P = data.X, data.train_pairs
    std = X[P.reshape(-1)].std(0).clamp(min=1e-6)  # standardisation of the training pairs' images
    train_diffs = standardised_differences(X, P, std)  # (P, D)
    eval_diffs = {u: standardised_differences(X, p, std) for u, p in data.eval_by_user.items()}

    def seeded(users: Callable[[], nn.Module]) -> tuple[nn.Linear, nn.Module]:
        """A fresh basis and user module initialised from the probe's seed alone, not from the global generator
        (whose state depends on what else ran in this process before: a cached upstream stage or a computed one)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return nn.Linear(X.shape[1], cfg.pair_rank, bias=False), users()

    rows = []
    with single_thread():
        basis, shared = seeded(partial(nn.Embedding, 1, cfg.pair_rank))
        zeros = torch.zeros(len(P), dtype=torch.long)
        fit_bradley_terry(basis, shared, zeros, train_diffs, cfg.pair_steps, cfg.pair_lr, cfg.pair_l2)
        with torch.no_grad():
            margin = (shared.weight[0] * basis(torch.cat(list(eval_diffs.values())))).sum(-1)
        rows.append(_row(POPULATION, "population", "bt_population", _accuracy(margin), len(margin), shots))
        done()
        encoder = None
        if (Path(encoder_dir) / WEIGHTS_FILE).is_file():
            encoder, _ = PreferenceEncoder.load(encoder_dir)
        for name, kind in embedders.items():
            table, emb = read_embeddings(embed_dir, name)
            if cfg.rows == "last" and emb.ndim == 3:
                emb = emb[:, -1]
            split = np.asarray(table.column("split").to_pylist())
            users = np.asarray(table.column("user_id").to_pylist(), dtype=np.int64)
            test = [i for i in range(len(users)) if split[i] == "unseen" and int(users[i]) in eval_diffs]
            if kind == "encoder" and encoder is not None:
                # the encoder's own head: z . (g(x_w) - g(x_l)), z being the stored embedding
                z, method = torch.from_numpy(emb.reshape(len(emb), -1)), "encoder_head"
                with torch.no_grad():
                    scored = {
                        u: encoder.basis(standardised_differences(X, p, encoder.feature_std))
                        for u, p in data.eval_by_user.items()
                    }
            else:
                x = torch.from_numpy(features(emb, split == "seen"))  # (S, E) standardised on seen sets
                index = {sid: i for i, sid in enumerate(table.column("shot_set_id").to_pylist())}
                keep = [i for i, sid in enumerate(data.train_sets) if sid in index]
                basis, read = seeded(partial(nn.Linear, x.shape[1], cfg.pair_rank))
                inputs = x[torch.as_tensor([index[data.train_sets[i]] for i in keep], dtype=torch.long)]
                fit_bradley_terry(
                    basis, read, inputs, train_diffs[keep], cfg.pair_steps, cfg.pair_lr, cfg.pair_l2
                )
                with torch.no_grad():
                    z, method = read(x), "bt_probe"
                    scored = {u: basis(d) for u, d in eval_diffs.items()}
            with torch.no_grad():
                margins = [(z[i] * scored[int(users[i])]).sum(-1) for i in test]
            if margins:
                m = torch.cat(margins)
                rows.append(_row(name, kind, method, _accuracy(m), len(m), shots))
            done()
    return rows

"""The user-identification probe (the paper): how much of a user do frozen embeddings hold?

Three readers of the same standardised features, one top-k accuracy:

* ``mlp``: the paper's probe, Linear in->hidden + GELU, ``blocks`` residual blocks of
  [Linear, GELU, LayerNorm, Dropout], Linear hidden->classes; Adam with weight decay, cosine
  schedule after a 10% linear warmup, cross-entropy.
* ``nearest_centroid``: cosine similarity to each class's mean training feature (no training).
* ``chance``: k / n_classes.

Tasks. ``user_id``: which seen user wrote a held-out shot set (the last ``test_sets_per_user``
sets of each seen user; users with too few sets only train). ``archetype_unseen``: the archetype
of an unseen user's set, by nearest centroid over archetypes built from seen users' training sets
only. ``archetype_seen_heldout``: the same centroids on the seen users' held-out sets.
``preference_unseen`` (synthetic world only, method ``ridge``): a ridge read of each user's true preference
vector from the standardised embedding, fitted on seen users' sets; the "accuracy" is the mean cosine between
the read and the truth over unseen users' sets (``n_classes`` 0: a regression). It asks what the diffusion
adapter needs: a *linear* read of the user's taste that carries over to new users.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppd_core.config import ProbeConfig
from ppd_core.errors import StageError

WARMUP_FRACTION = 0.1
RIDGE_PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0)  # ridge penalties the preference read chooses from
RIDGE_FOLDS = 5  # user-grouped folds of the seen users that choose the penalty


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)  # (N, width)


class ProbeMLP(nn.Module):
    """The paper's probe: (N, in_dim) features -> (N, num_classes) logits."""

    def __init__(self, in_dim: int, hidden: int, blocks: int, dropout: float, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU())
        self.blocks = nn.Sequential(*(ResidualBlock(hidden, dropout) for _ in range(blocks)))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def features(embeddings: np.ndarray, train: np.ndarray | None = None) -> np.ndarray:
    """(N, *shape) -> float32 (N, D): flattened, standardised per dimension with the mean/std of the
    ``train`` rows only (a boolean mask or indices; None: all rows). Constant dimensions become 0."""
    x = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)  # (N, D)
    fit = x if train is None else x[train]
    if len(fit) == 0:
        raise ValueError("cannot standardise features without training rows")
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    return ((x - mean) / np.where(std > 1e-12, std, 1.0)).astype(np.float32)


def split_sets(user_ids: np.ndarray, set_index: np.ndarray, test_sets_per_user: int) -> np.ndarray:
    """Boolean test mask (N,): for each user with at least ``test_sets_per_user + 1`` sets, the sets with
    the largest ``set_index`` are test and the rest train; users with fewer sets go to train only (they
    still count as classes, but nothing of theirs is scored)."""
    user_ids, set_index = np.asarray(user_ids), np.asarray(set_index)
    if user_ids.shape != set_index.shape or user_ids.ndim != 1:
        raise ValueError(
            f"user_ids {user_ids.shape} and set_index {set_index.shape} must be equal 1-d shapes"
        )
    test = np.zeros(len(user_ids), dtype=bool)
    order = np.lexsort((set_index, user_ids))  # by user, then set index
    _, starts, counts = np.unique(user_ids[order], return_index=True, return_counts=True)
    for start, count in zip(starts, counts, strict=True):
        if count >= test_sets_per_user + 1:
            test[order[start + count - test_sets_per_user : start + count]] = True
    return test


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, math.ceil(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the block (process-wide, restored after).

    The probe's matmuls are small (batch 64, width 512): a second thread barely helps when the CPU
    is idle and, on a busy 2-core machine, made epochs 5-40x slower (measured: 0.17 s per epoch on
    one thread against 1-7 s on two). One thread also makes the result independent of the core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_probe(
    x_train: np.ndarray, y_train: np.ndarray, cfg: ProbeConfig, num_classes: int | None = None
) -> ProbeMLP:
    """Train the MLP probe on CPU, one thread; deterministic for ``cfg.seed`` (the caller's torch RNG is
    untouched). Returns the model in eval mode."""
    x = torch.as_tensor(np.asarray(x_train, dtype=np.float32))  # (N, D)
    y = torch.as_tensor(np.asarray(y_train, dtype=np.int64))  # (N,)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    with single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # init and dropout
        model = ProbeMLP(x.shape[1], cfg.hidden, cfg.blocks, cfg.dropout, num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, total))
        shuffle = torch.Generator().manual_seed(cfg.seed)
        model.train()
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x), generator=shuffle).split(cfg.batch_size):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: ProbeMLP, x: np.ndarray) -> np.ndarray:
    """Logits (N, num_classes) as float32 numpy."""
    return model(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()


def topk_accuracy(scores: np.ndarray, y: np.ndarray, ks: tuple[int, ...] | list[int]) -> dict[int, float]:
    """Fraction of rows whose true class is among the k highest scores, per k (k is capped at the number
    of classes). Ties are broken towards the lower class index."""
    scores, y = np.asarray(scores), np.asarray(y)
    if len(y) == 0:
        raise ValueError("top-k accuracy of zero rows is undefined")
    ranking = np.argsort(-scores, axis=1, kind="stable")  # (N, C) best first
    rank_of_true = np.argmax(ranking == y[:, None], axis=1)  # (N,) 0 = best
    return {int(k): float(np.mean(rank_of_true < k)) for k in ks}


def nearest_centroid(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int | None = None
) -> np.ndarray:
    """Cosine similarity (N_test, C) of each test row to each class's mean training row; a class without
    training rows scores -inf."""
    x_train, x_test = np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.int64)
    num_classes = int(y_train.max()) + 1 if num_classes is None else num_classes
    sums = np.zeros((num_classes, x_train.shape[1]))
    np.add.at(sums, y_train, x_train)
    counts = np.bincount(y_train, minlength=num_classes)
    centroids = sums / np.maximum(counts, 1)[:, None]  # (C, D)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    scores = unit(x_test) @ unit(centroids).T  # (N_test, C)
    scores[:, counts == 0] = -np.inf
    return scores


def _ridge(x: np.ndarray, y: np.ndarray, penalties: tuple[float, ...]) -> list[np.ndarray]:
    """Ridge weights (D + 1, A) of ``y`` (N, A) on ``x`` (N, D) with an unpenalised intercept, one per
    penalty, through one SVD of the centred rows (cheap whether N or D is the larger)."""
    mx, my = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - mx, full_matrices=False)
    uy = u.T @ (y - my)  # (R, A)
    out = []
    for lam in penalties:
        w = vt.T @ ((s / (s**2 + lam))[:, None] * uy)  # (D, A)
        out.append(np.vstack([w, (my - mx @ w)[None]]))
    return out


def _mean_cosine(x: np.ndarray, w: np.ndarray, y: np.ndarray) -> float:
    pred = x @ w[:-1] + w[-1]
    norms = np.linalg.norm(pred, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean((pred * y).sum(1) / np.maximum(norms, 1e-12)))


def preference_read(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, fit: np.ndarray, test: np.ndarray
) -> tuple[float, float]:
    """Mean cosine over the ``test`` rows between a ridge read of ``y`` (N, A) from ``x`` (N, D) and ``y``,
    the read fitted on the ``fit`` rows; the penalty is chosen by user-grouped cross-validation (``groups``:
    the user of each row) within the fit rows. Returns (cosine, chosen penalty)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    fit_idx = np.flatnonzero(fit)
    users = np.unique(groups[fit_idx])
    fold_of = {int(u): i % RIDGE_FOLDS for i, u in enumerate(users)}  # sorted users, dealt round-robin
    folds = np.array([fold_of[int(u)] for u in groups[fit_idx]])
    scores = np.zeros(len(RIDGE_PENALTIES))
    for f in range(min(RIDGE_FOLDS, len(users))):
        tr, va = fit_idx[folds != f], fit_idx[folds == f]
        for i, w in enumerate(_ridge(x[tr], y[tr], RIDGE_PENALTIES)):
            scores[i] += _mean_cosine(x[va], w, y[va]) * len(va)
    penalty = RIDGE_PENALTIES[int(np.argmax(scores))]
    (w,) = _ridge(x[fit_idx], y[fit_idx], (penalty,))
    return _mean_cosine(x[test], w, y[test]), penalty


def _rows(task: str, method: str, accuracy: dict[int, float], n_test: int, n_classes: int) -> list[dict]:
    return [
        {"task": task, "method": method, "k": k, "accuracy": acc, "n_test": n_test, "n_classes": n_classes}
        for k, acc in accuracy.items()
    ]


def _chance(ks: tuple[int, ...], n_classes: int) -> dict[int, float]:
    return {int(k): min(k, n_classes) / n_classes for k in ks}


def run_probe(
    embeddings: np.ndarray,
    user_ids: np.ndarray,
    set_index: np.ndarray,
    cfg: ProbeConfig,
    archetypes: dict[int, int] | None = None,
    unseen_mask: np.ndarray | None = None,
    preferences: dict[int, np.ndarray] | None = None,
) -> list[dict]:
    """All probe rows for one embedder's vectors (N sets). ``unseen_mask`` (N,) marks unseen users' sets:
    they never enter the user task, standardisation or centroids. ``archetypes`` (user id -> archetype)
    adds the archetype tasks (``archetype_unseen`` only when there are unseen sets); ``preferences`` (user id
    -> true preference vector) adds ``preference_unseen`` (read fitted on seen users' sets only)."""
    embeddings = np.asarray(embeddings)
    user_ids, set_index = np.asarray(user_ids, dtype=np.int64), np.asarray(set_index)
    n = len(embeddings)
    unseen = np.zeros(n, dtype=bool) if unseen_mask is None else np.asarray(unseen_mask, dtype=bool)
    if not (len(user_ids) == len(set_index) == len(unseen) == n):
        raise ValueError("embeddings, user_ids, set_index and unseen_mask must have one row per set")
    seen = ~unseen
    test = np.zeros(n, dtype=bool)
    test[seen] = split_sets(user_ids[seen], set_index[seen], cfg.test_sets_per_user)
    train = seen & ~test
    if not test.any():
        raise StageError(
            f"probe: no seen user has more than test_sets_per_user={cfg.test_sets_per_user} shot sets"
        )
    x = features(embeddings, train)  # (N, D) standardised with the seen training sets' stats

    classes, y = np.unique(user_ids, return_inverse=True)
    seen_classes = np.unique(y[seen])
    label = np.full(len(classes), -1)
    label[seen_classes] = np.arange(len(seen_classes))  # seen users -> 0..C-1
    y_user = label[y]
    n_users, n_test = len(seen_classes), int(test.sum())
    model = train_probe(x[train], y_user[train], cfg, num_classes=n_users)
    rows = _rows(
        "user_id", "mlp", topk_accuracy(predict(model, x[test]), y_user[test], cfg.topk), n_test, n_users
    )
    nc = nearest_centroid(x[train], y_user[train], x[test], n_users)
    rows += _rows("user_id", "nearest_centroid", topk_accuracy(nc, y_user[test], cfg.topk), n_test, n_users)
    rows += _rows("user_id", "chance", _chance(cfg.topk, n_users), n_test, n_users)

    if archetypes is not None:
        # users without an archetype (the relabel stage's reward users, not the world's) take no part
        arch = np.array([archetypes.get(int(u), -1) for u in user_ids])
        people = arch >= 0
        arch_values, y_arch = np.unique(
            np.where(people, arch, arch[people].min(initial=0)), return_inverse=True
        )
        n_arch = len(arch_values)
        # centroids from the seen users' training sets only, for both archetype tasks
        for task, where in (("archetype_unseen", unseen & people), ("archetype_seen_heldout", test & people)):
            if not where.any():
                continue
            scores = nearest_centroid(x[train & people], y_arch[train & people], x[where], n_arch)
            count = int(where.sum())
            rows += _rows(task, "nearest_centroid", topk_accuracy(scores, y_arch[where], (1,)), count, n_arch)
            rows += _rows(task, "chance", _chance((1,), n_arch), count, n_arch)

    if preferences is not None:
        # users without a true vector (reward users) take no part
        known = np.array([int(u) in preferences for u in user_ids])
        fit, where = seen & known, unseen & known
        if where.any() and len(np.unique(user_ids[fit])) >= 2:
            width = len(next(iter(preferences.values())))
            truth = np.stack(
                [np.asarray(preferences.get(int(u), np.zeros(width))) for u in user_ids]
            )  # (N, A)
            cosine, _ = preference_read(x, truth, user_ids, fit, where)
            rows += _rows("preference_unseen", "ridge", {1: cosine}, int(where.sum()), 0)
    return rows

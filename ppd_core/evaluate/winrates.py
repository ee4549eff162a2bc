"""Win-rate statistics of judged comparisons: pure numpy / pyarrow, no models.

Input: a table of comparisons (schema ``ppd_core.schemas.COMPARISONS``, one judge per table), one row
per (model, baseline, user, prompt, seed) with the judge's outcome (1 model wins, 0 baseline wins,
-1 inconsistent) and the primary reward of both images.

- The **win rate** is over consistent comparisons (wins / (wins + losses)); the **inconsistency
  rate** is reported beside it, as the paper's judge accounting asks (the paper, #11).
- The **reward gain** is the mean over comparisons of ``(reward_model - reward_baseline) /
  reward_std``, i.e. in reward-std units. ``reward_std`` is a per-row column so it can be a global
  std or a per-user one; the evaluate stage should use the std of the user's reward over a fixed
  reference population of images (for the synthetic oracle: the world's images, where it is ~1 since
  the user's weights are unit and the attributes z-scored), never the compared models' own samples.
  A win rate alone misleads: a tiny consistent shift wins almost every paired comparison
  (the toy-world measurements), so the gain always goes beside it.
- **Intervals** are percentile intervals of a cluster bootstrap that resamples *users* with all their
  comparisons: comparisons of one user share the user's embedding and taste, so they are correlated
  and resampling them one by one would overstate the precision. Both statistics use the same
  resamples. A seed gives the same intervals whatever the row order or the other groups.

:func:`monotonicity` checks the interpolation study: a reward should rise with the weight a of
``u = a*u_A + (1-a)*u_B``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from ppd_core.errors import InputError, SchemaError
from ppd_core.schemas import USER_WIN_RATES, WIN_RATES

REQUIRED_COLUMNS = (
    "user_id",
    "group",
    "model",
    "baseline",
    "outcome",
    "reward_model",
    "reward_baseline",
    "reward_std",
)
GROUP_KEYS = ("group", "model", "baseline")


# ------------------------------------------------------------------------------------- columns


def _columns(rows: pa.Table) -> dict[str, np.ndarray]:
    """The required columns as numpy, checked; null rewards become NaN (they drop out of the gain)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.column_names]
    if missing:
        raise SchemaError(f"comparisons table lacks columns {missing} (see ppd_core.schemas.COMPARISONS)")
    for c in ("user_id", "group", "model", "baseline", "outcome"):
        if rows.column(c).null_count:
            raise InputError(f"comparisons column {c!r} has nulls")
    cols = {c: np.asarray(rows.column(c).to_pylist(), dtype=object) for c in GROUP_KEYS}
    cols["user_id"] = rows.column("user_id").to_numpy().astype(np.int64)
    cols["outcome"] = rows.column("outcome").to_numpy().astype(np.int64)
    for c in ("reward_model", "reward_baseline", "reward_std"):
        cols[c] = rows.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = sorted(set(np.unique(cols["outcome"]).tolist()) - {-1, 0, 1})
    if bad:
        raise InputError(
            f"outcomes must be 1 (model wins), 0 (baseline wins) or -1 (inconsistent), got {bad}"
        )
    std = cols["reward_std"]
    if np.any(std[np.isfinite(std)] <= 0):
        raise InputError("reward_std must be positive")
    return cols


def reward_gain(reward_model: np.ndarray, reward_baseline: np.ndarray, reward_std: np.ndarray) -> np.ndarray:
    """float (N,): (reward_model - reward_baseline) / reward_std; NaN where any of them is missing."""
    return (np.asarray(reward_model, float) - np.asarray(reward_baseline, float)) / np.asarray(
        reward_std, float
    )


def _group_rows(cols: dict[str, np.ndarray]) -> list[tuple[tuple[str, str, str], np.ndarray]]:
    """[(group, model, baseline), row indices] sorted by key."""
    keys = list(zip(*(cols[k].tolist() for k in GROUP_KEYS), strict=True))
    index: dict[tuple[str, str, str], list[int]] = {}
    for i, key in enumerate(keys):
        index.setdefault(key, []).append(i)
    return [(key, np.asarray(index[key])) for key in sorted(index)]


def _user_sums(users: np.ndarray, outcome: np.ndarray, gain: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user sums, each (U,) in ascending user order: comparisons, consistent, wins, gain sum and
    count of finite gains."""
    ids, inverse = np.unique(users, return_inverse=True)
    finite = np.isfinite(gain)

    def total(weights) -> np.ndarray:
        return np.bincount(inverse, weights=np.asarray(weights, float), minlength=len(ids))

    return {
        "user_id": ids,
        "n": total(np.ones(len(users))),
        "consistent": total(outcome != -1),
        "wins": total(outcome == 1),
        "gain_sum": total(np.where(finite, gain, 0.0)),
        "gain_n": total(finite),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den, NaN where den is 0."""
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=np.asarray(den) > 0)


def _pooled(num: np.ndarray, den: np.ndarray) -> float:
    """sum(num) / sum(den) over users, NaN when the denominator is 0."""
    total = float(den.sum())
    return float(num.sum()) / total if total > 0 else float("nan")


# ------------------------------------------------------------------------------------ bootstrap


def bootstrap_counts(clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """int (n_boot, clusters): how often each cluster is drawn in each resample (with replacement)."""
    draws = rng.integers(0, clusters, size=(n_boot, clusters))  # (B, K)
    offsets = (np.arange(n_boot) * clusters)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * clusters).reshape(n_boot, clusters)


def ratio_interval(
    counts: np.ndarray, numerators: np.ndarray, denominators: np.ndarray, confidence: float
) -> tuple[float, float]:
    """Percentile interval of sum(num) / sum(den) over the resamples ``counts`` (B, K) of K clusters.
    Resamples whose denominator is 0 (e.g. only inconsistent comparisons) are left out."""
    ratios = _ratio(counts @ numerators, counts @ denominators)  # (B,)
    ratios = ratios[np.isfinite(ratios)]
    if not ratios.size:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)


def _group_seed(seed: int, key: tuple[str, ...]) -> np.random.Generator:
    """One generator per group, so a group's interval depends on neither row order nor other groups."""
    return np.random.default_rng([int(seed) % (1 << 63), zlib.crc32("\x1f".join(key).encode())])


# ----------------------------------------------------------------------------------------- tables


def win_rates(rows: pa.Table, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> pa.Table:
    """One row per (group, model, baseline) with win rate, inconsistency rate and reward gain, the
    win rate and gain with user-cluster bootstrap intervals (schema ``WIN_RATES``)."""
    if n_boot < 1 or not 0 < confidence < 1:
        raise InputError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    cols = _columns(rows)
    gain = reward_gain(cols["reward_model"], cols["reward_baseline"], cols["reward_std"])  # (N,)
    records = []
    for key, idx in _group_rows(cols):
        sums = _user_sums(cols["user_id"][idx], cols["outcome"][idx], gain[idx])  # each (U,)
        counts = bootstrap_counts(len(sums["user_id"]), n_boot, _group_seed(seed, key))  # (B, U)
        n, consistent, wins = (int(sums[k].sum()) for k in ("n", "consistent", "wins"))
        win_low, win_high = ratio_interval(counts, sums["wins"], sums["consistent"], confidence)
        gain_low, gain_high = ratio_interval(counts, sums["gain_sum"], sums["gain_n"], confidence)
        records.append(
            dict(zip(GROUP_KEYS, key, strict=True))
            | {
                "n": n,
                "n_users": len(sums["user_id"]),
                "n_consistent": consistent,
                "wins": wins,
                "win_rate": _pooled(sums["wins"], sums["consistent"]),
                "win_rate_low": win_low,
                "win_rate_high": win_high,
                "inconsistency_rate": 1 - consistent / n,
                "reward_gain": _pooled(sums["gain_sum"], sums["gain_n"]),
                "reward_gain_low": gain_low,
                "reward_gain_high": gain_high,
                "confidence": float(confidence),
                "n_boot": int(n_boot),
            }
        )
    return pa.Table.from_pylist(records, schema=WIN_RATES)


def per_user(rows: pa.Table) -> pa.Table:
    """The same statistics per (group, model, baseline, user), without intervals (``USER_WIN_RATES``)."""
    cols = _columns(rows)
    gain = reward_gain(cols["reward_model"], cols["reward_baseline"], cols["reward_std"])  # (N,)
    records = []
    for key, idx in _group_rows(cols):
        sums = _user_sums(cols["user_id"][idx], cols["outcome"][idx], gain[idx])
        win_rate = _ratio(sums["wins"], sums["consistent"])  # (U,)
        user_gain = _ratio(sums["gain_sum"], sums["gain_n"])  # (U,)
        for u, user in enumerate(sums["user_id"]):
            records.append(
                dict(zip(GROUP_KEYS, key, strict=True))
                | {
                    "user_id": int(user),
                    "n": int(sums["n"][u]),
                    "n_consistent": int(sums["consistent"][u]),
                    "wins": int(sums["wins"][u]),
                    "win_rate": float(win_rate[u]),
                    "inconsistency_rate": float(1 - sums["consistent"][u] / sums["n"][u]),
                    "reward_gain": float(user_gain[u]),
                }
            )
    return pa.Table.from_pylist(records, schema=USER_WIN_RATES)


# --------------------------------------------------------------------------------- monotonicity


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's rho needs)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties averaged); NaN when either side is constant."""
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / norm) if norm > 0 else float("nan")


def monotonicity(
    alphas: Sequence[float],
    values: Sequence[float],
    tolerance: float = 0.0,
    samples: np.ndarray | None = None,
    z: float = 2.0,
) -> dict:
    """Does ``values`` rise with ``alphas``? {"n", "spearman" (rank correlation), "max_drop" (largest
    decrease between consecutive alphas, 0 when none), "monotone" (no decrease larger than
    ``tolerance``, i.e. non-decreasing within it)}.

    With ``samples`` (len(alphas), m): the paired per-sample values behind each mean (the same prompts
    and seeds at every alpha), also {"max_drop_z" (the largest decrease in units of its paired standard
    error), "rise_z" (the change from the smallest to the largest alpha in its standard error),
    "monotone_within_noise" (it rises end to end by more than ``z`` standard errors and no step falls by
    more than ``z`` of its own)}: a strict "no decrease at all" reads sampling noise in a flat stretch as
    failure, while this one asks for a real rise and no real reversal."""
    alphas, values = np.asarray(alphas, float), np.asarray(values, float)
    if alphas.shape != values.shape or alphas.ndim != 1 or len(alphas) < 2:
        raise InputError(
            f"need two equal-length 1-D sequences of >= 2 values, got {alphas.shape}, {values.shape}"
        )
    order = np.argsort(alphas, kind="stable")
    ordered = values[order]
    max_drop = float(max(0.0, -np.diff(ordered).min()))
    out = {
        "n": len(values),
        "spearman": spearman(alphas, values),
        "max_drop": max_drop,
        "monotone": bool(max_drop <= tolerance),
    }
    if samples is not None:
        samples = np.asarray(samples, float)
        if samples.ndim != 2 or samples.shape[0] != len(alphas) or samples.shape[1] < 2:
            raise InputError(f"samples must be (len(alphas), m >= 2), got {samples.shape}")
        ordered_samples = samples[order]
        steps = np.diff(ordered_samples, axis=0)  # (len(alphas) - 1, m) paired differences
        drop_z = -steps.mean(axis=1) / _standard_error(steps)
        rise = ordered_samples[-1] - ordered_samples[0]
        rise_z = float(rise.mean() / _standard_error(rise[None])[0])
        out["max_drop_z"] = float(max(0.0, drop_z.max()))
        out["rise_z"] = rise_z
        out["monotone_within_noise"] = bool(rise_z > z and out["max_drop_z"] <= z)
    return out


def _standard_error(diffs: np.ndarray) -> np.ndarray:
    """(k, m) paired differences -> (k,) standard errors of their means (a tiny floor: identical samples
    give an exact zero difference, not a division by zero)."""
    return np.maximum(diffs.std(axis=1, ddof=1) / np.sqrt(diffs.shape[1]), 1e-12)

"""The evaluate stage's scoring and judging steps: rewards over every image, judged comparisons of a
model against a baseline on the same request, win-rate tables per judge, and each judge's agreement
with the users' own held-out labels.

"One reward std" of a user is the std of that user's primary reward over a fixed sample of dataset
images (never the compared models' samples), so a reward gain reads the same across models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from ppd_core.config import PPDConfig
from ppd_core.data.fewshot import read_fewshot
from ppd_core.evaluate.judges import Judge, judge_agreement, load_judge
from ppd_core.evaluate.winrates import per_user, win_rates
from ppd_core.rewards.scorers import Reward
from ppd_core.schemas import COMPARISONS

ScoreLookup = Callable[[tuple[str, str]], np.ndarray | None]
# (model, baseline) comparisons, made when both were generated; the "vs base" rows headline the report
COMPARISON_PAIRS = (
    ("ppd", "base"),
    ("ppd_true", "base"),
    ("ppd_shots", "base"),
    ("dpo", "base"),
    ("sft", "base"),
    ("ppd", "dpo"),
    ("ppd", "sft"),
)


def score_all(
    rewards: Sequence[Reward], images: Mapping[str, np.ndarray], prompts: Sequence[str], users: Sequence[int]
) -> dict[tuple[str, str], np.ndarray]:
    """(model, reward name) -> scores (N,) of that model's images."""
    out = {}
    for model, imgs in images.items():
        for reward in rewards:
            out[(model, reward.name)] = reward.score(imgs, prompts, users if reward.per_user else None)
    return out


def scores_table(scores: Mapping[tuple[str, str], np.ndarray]) -> pa.Table:
    rows = {"model": [], "reward": [], "request": [], "score": []}
    for (model, reward), values in scores.items():
        rows["model"] += [model] * len(values)
        rows["reward"] += [reward] * len(values)
        rows["request"] += list(range(len(values)))
        rows["score"] += [float(v) for v in values]
    return pa.table(rows)


def primary_reward(rewards: Sequence[Reward]) -> Reward | None:
    """The reward whose gain goes beside every win rate: the user's oracle when there is one, else the first."""
    per_user = [r for r in rewards if r.per_user]
    return (per_user or list(rewards) or [None])[0]


def reward_std(reward: Reward | None, reference: np.ndarray, users: Sequence[int]) -> dict[int, float]:
    """user -> std of the reward over the reference images (one value for all users if not per-user)."""
    if reward is None:
        return {u: float("nan") for u in users}
    prompts = [""] * len(reference)
    if not reward.per_user:
        std = float(np.std(reward.score(reference, prompts)))
        return {u: std for u in users}
    return {
        u: float(np.std(reward.score(reference, prompts, np.full(len(reference), u, dtype=np.int64))))
        for u in users
    }


def shot_sets(fewshot_dir: Path, ingest_dir: Path, ids: Sequence[str]) -> dict[str, object]:
    """shot set id -> ShotSet with images (what a VLM judge is shown)."""
    from ppd_core.embed.extract import shot_sets_by_id, to_shot_set

    wanted = list(dict.fromkeys(ids))
    return {
        r["shot_set_id"]: to_shot_set(r, Path(ingest_dir)) for r in shot_sets_by_id(Path(fewshot_dir), wanted)
    }


def load_judges(cfg: PPDConfig, rewards: Sequence[Reward], world, tiny_models: Path | None) -> list[Judge]:
    by_name = {r.name: r for r in rewards}
    tiny_vlm = Path(tiny_models) / "vlm" if tiny_models else None
    judges = []
    for spec in cfg.evaluate.judges:
        if spec.kind == "oracle" and world is None:
            continue  # no synthetic world: real data has no oracle
        if spec.kind == "reward" and spec.reward not in by_name:
            continue  # its reward was skipped (reported with the rewards)
        judges.append(load_judge(spec, by_name, world, tiny_vlm, seed=cfg.evaluate.seed))
    return judges


def _limit(cfg: PPDConfig, judge: Judge) -> int | None:
    return next((j.limit for j in cfg.evaluate.judges if j.name == judge.name), None)


def compare(
    cfg: PPDConfig,
    judges: Sequence[Judge],
    pairs: Sequence[tuple[str, str]],
    requests: pa.Table,
    images: Mapping[str, np.ndarray],
    sets: Mapping[str, object],
    scores: ScoreLookup,
    primary: Reward | None,
    std: Mapping[int, float],
) -> pa.Table:
    """One row per (judge, model, baseline, request) in ``COMPARISONS`` layout plus a ``judge`` column."""
    users = np.asarray(requests.column("user_id").to_pylist(), dtype=np.int64)
    groups = requests.column("group").to_pylist()
    prompts = requests.column("prompt").to_pylist()
    seeds = requests.column("seed").to_pylist()
    set_ids = requests.column("shot_set_id").to_pylist()
    tables = []
    for judge in judges:
        limit = _limit(cfg, judge)
        for model, baseline in pairs:
            idx = np.arange(len(users))
            if limit is not None and limit < len(idx):
                idx = np.sort(np.random.default_rng(cfg.evaluate.seed).permutation(idx)[:limit])
            outcome = judge.decide(
                users[idx].tolist(),
                [sets.get(set_ids[i]) for i in idx],
                [prompts[i] for i in idx],
                images[model][idx],
                images[baseline][idx],
            )
            nan = np.full(len(users), np.nan)
            r_model = scores((model, primary.name)) if primary else nan
            r_base = scores((baseline, primary.name)) if primary else nan
            table = pa.table(
                {
                    "user_id": users[idx],
                    "group": [groups[i] for i in idx],
                    "model": [model] * len(idx),
                    "baseline": [baseline] * len(idx),
                    "prompt": [prompts[i] for i in idx],
                    "seed": [int(seeds[i]) for i in idx],
                    "outcome": np.asarray(outcome, dtype=np.int8),
                    "reward_model": r_model[idx],
                    "reward_baseline": r_base[idx],
                    "reward_std": [std[int(u)] for u in users[idx]],
                },
                schema=COMPARISONS,
            )
            tables.append(table.append_column("judge", pa.array([judge.name] * len(idx))))
    return (
        pa.concat_tables(tables)
        if tables
        else COMPARISONS.append(pa.field("judge", pa.string())).empty_table()
    )


def win_rate_tables(cfg: PPDConfig, comparisons: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Win rates (with intervals) and the per-user breakdown, each with a leading ``judge`` column."""
    e = cfg.evaluate
    rates, users = [], []
    judges = comparisons.column("judge").to_pylist()
    for judge in dict.fromkeys(judges):
        rows = comparisons.filter(pa.compute.equal(comparisons.column("judge"), judge)).drop(["judge"])
        r = win_rates(rows, e.bootstrap, e.confidence, e.seed)
        u = per_user(rows)
        rates.append(r.add_column(0, "judge", pa.array([judge] * len(r))))
        users.append(u.add_column(0, "judge", pa.array([judge] * len(u))))
    if not rates:
        return pa.table({}), pa.table({})
    return pa.concat_tables(rates), pa.concat_tables(users)


def agreement_table(
    cfg: PPDConfig,
    judges: Sequence[Judge],
    dirs: Mapping[str, Path],
    first: Mapping[int, tuple[str, np.ndarray]],
    sets: Mapping[str, object],
) -> pa.Table:
    """Each judge's agreement with held-out labelled pairs of the evaluated users (their own choices).

    ``first``: user -> (conditioning shot set id, embedding) of the evaluated users; ``sets``: those shot sets."""
    from ppd_core.data.images import ingest_images

    e = cfg.evaluate
    evaluated = {u for u, (sid, _) in first.items() if sid in sets}
    pairs = read_fewshot(dirs["fewshot"], "eval_pairs").to_pylist()
    rows = [r for r in pairs if r["user_id"] in evaluated]
    rows = [
        rows[i] for i in sorted(np.random.default_rng(e.seed).permutation(len(rows))[: e.agreement_pairs])
    ]
    if not rows:
        return pa.table({"judge": pa.array([], pa.string())})
    store = ingest_images(Path(dirs["ingest"]))
    winners = np.stack(
        [np.asarray(store.get_pil(r["winner_uid"]).convert("RGB")) for r in rows]
    )  # (P, H, W, 3)
    losers = np.stack([np.asarray(store.get_pil(r["loser_uid"]).convert("RGB")) for r in rows])
    users = [int(r["user_id"]) for r in rows]
    shots = [sets[first[u][0]] for u in users]
    prompts = [r["caption"] or "" for r in rows]
    out = []
    for judge in judges:
        n = _limit(cfg, judge) or len(rows)
        result = judge_agreement(
            judge, users[:n], shots[:n], prompts[:n], winners[:n], losers[:n], rng_seed=e.seed
        )
        out.append({"judge": judge.name, **result})
    return pa.Table.from_pylist(out)

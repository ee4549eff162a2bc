"""The multi-reward experiment's inference half: interpolate between two reward users' embeddings.

Reward users are "users" whose labels follow one reward (the `relabel` stage, :mod:`ppd_core.rewards.relabel`:
on the synthetic world single attributes standing in for CLIP score, aesthetic and HPS; on real data
real reward models). They are trained on like any seen user, in the same PPD model. Here, for each
pair (A, B) and weight a, the model generates from ``u = a * u_A + (1 - a) * u_B`` (u_X: the reward
user's embedding, as for any seen user) on fixed prompts and seeds, and every loaded reward scores the images.
A's own reward should rise with a and B's fall: ``monotonicity`` reports the Spearman correlation and
the largest step against the expected direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import numpy as np
import pyarrow as pa

from ppd_core.config import PPDConfig
from ppd_core.evaluate.generate import ModelSet, Settings, embedder_for
from ppd_core.evaluate.winrates import monotonicity
from ppd_core.rewards.scorers import Reward
from ppd_core.schemas import INTERPOLATION, MONOTONICITY

INTERPOLATED_MODELS = ("ppd", "ppd_true")


def interpolation_study(
    cfg: PPDConfig,
    models: ModelSet,
    conditions: Callable[[str], Mapping[int, tuple[str, np.ndarray]]],
    reward_users: Mapping[str, int],
    rewards: Sequence[Reward],
    prompts: Sequence[str],
) -> tuple[pa.Table, pa.Table]:
    """(INTERPOLATION rows, MONOTONICITY rows); empty with fewer than two reward users.

    ``conditions(embedder)``: user -> (shot set id, embedding), as the evaluate stage reads it once
    per embedder; ``reward_users``: reward name -> user id (the relabel stage's); ``prompts``: one seed each.
    """
    rows, checks = [], []
    scorers = [r for r in rewards if not r.per_user]  # a per-user oracle has no user for a mixed embedding
    by_name = {r.name: r for r in scorers}
    users = {name: u for name, u in reward_users.items() if name in by_name}  # own reward loaded
    e = cfg.evaluate
    prompts, seeds = list(prompts), list(range(len(prompts)))
    settings = Settings.from_config(cfg)
    for model in INTERPOLATED_MODELS:
        if model not in models.adapters or not prompts:
            continue
        table = conditions(embedder_for(cfg, model))
        present = [name for name in users if users[name] in table]
        for a, b in combinations(present, 2):
            u_a, u_b = table[users[a]][1], table[users[b]][1]
            scored: dict[str, list[np.ndarray]] = {a: [], b: []}  # per alpha: every prompt's score
            alphas = list(e.interpolation_alphas)
            # every weight's images in one sampler call (larger batches; each image keeps its own seed)
            emb = np.stack([alpha * u_a + (1 - alpha) * u_b for alpha in alphas for _ in prompts])
            generated = models.generate(model, prompts * len(alphas), seeds * len(alphas), emb, settings)
            for k, alpha in enumerate(alphas):
                images = generated[k * len(prompts) : (k + 1) * len(prompts)]  # (P, H, W, 3)
                for reward in scorers:
                    s = reward.score(images, prompts)  # (P,)
                    rows.append(
                        {
                            "model": model,
                            "user_a": a,
                            "user_b": b,
                            "alpha": float(alpha),
                            "reward": reward.name,
                            "mean": float(s.mean()),
                            "std": float(s.std()),
                            "n": len(s),
                        }
                    )
                    if reward.name in scored:
                        scored[reward.name].append(s)
            for name, sign, direction in ((a, 1.0, "rises with a"), (b, -1.0, "falls with a")):
                per_prompt = sign * np.stack(scored[name])  # (alphas, prompts), paired across alphas
                m = monotonicity(e.interpolation_alphas, per_prompt.mean(axis=1), samples=per_prompt)
                checks.append(
                    {
                        "model": model,
                        "user_a": a,
                        "user_b": b,
                        "reward": name,
                        "direction": direction,
                        "spearman": m["spearman"],
                        "max_step_against": m["max_drop"],
                        "monotone": m["monotone"],
                        "rise_z": m["rise_z"],
                        "max_step_against_z": m["max_drop_z"],
                        "monotone_within_noise": m["monotone_within_noise"],
                    }
                )
    return (
        pa.Table.from_pylist(rows, schema=INTERPOLATION),
        pa.Table.from_pylist(checks, schema=MONOTONICITY),
    )

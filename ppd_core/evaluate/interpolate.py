"""The multi-reward experiment's inference half: interpolate between two reward users' embeddings.

Reward users are "users" whose labels follow one reward (on the synthetic world, one attribute each:
stand-ins for CLIP score, aesthetic and HPS; WorldConfig.reward_users). They are trained on like any
seen user, in the same PPD model. Here, for each pair (A, B) and weight a, the model generates from
``u = a * u_A + (1 - a) * u_B`` (u_X: the reward user's first shot-set embedding) on fixed prompts and
seeds, and every reward scores the images. Reward A should rise with a and reward B fall:
``monotonicity`` reports the Spearman correlation and the largest step against the expected direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import numpy as np
import pyarrow as pa

from ppd_core.config import PPDConfig
from ppd_core.evaluate.generate import ModelSet, Settings, embedder_for
from ppd_core.evaluate.rewards import Reward
from ppd_core.evaluate.winrates import monotonicity
from ppd_core.schemas import INTERPOLATION, MONOTONICITY

INTERPOLATED_MODELS = ("ppd", "ppd_true")


def attribute_rewards(cfg: PPDConfig, rewards: Sequence[Reward]) -> dict[str, Reward]:
    """attribute -> the loaded oracle_attribute reward measuring it."""
    loaded = {r.name: r for r in rewards}
    return {
        spec.attribute: loaded[spec.name]
        for spec in cfg.evaluate.rewards
        if spec.kind == "oracle_attribute" and spec.name in loaded
    }


def interpolation_study(
    cfg: PPDConfig,
    models: ModelSet,
    conditions: Callable[[str], Mapping[int, tuple[str, np.ndarray]]],
    world,
    rewards: Sequence[Reward],
) -> tuple[pa.Table, pa.Table]:
    """(INTERPOLATION rows, MONOTONICITY rows); empty without reward users. ``conditions(embedder)``: user ->
    (first shot set id, embedding), as the evaluate stage reads it once per embedder."""
    rows, checks = [], []
    if world is None:
        return INTERPOLATION.empty_table(), MONOTONICITY.empty_table()
    by_attribute = attribute_rewards(cfg, rewards)
    users = {a: u for a, u in world.reward_users().items() if a in by_attribute}
    e = cfg.evaluate
    prompts = list(world.captions[: e.interpolation_prompts])
    seeds = list(range(len(prompts)))
    settings = Settings.from_config(cfg)
    for model in INTERPOLATED_MODELS:
        if model not in models.adapters:
            continue
        table = conditions(embedder_for(cfg, model))
        present = [a for a in users if users[a] in table]
        for a, b in combinations(present, 2):
            u_a, u_b = table[users[a]][1], table[users[b]][1]
            means: dict[str, list[float]] = {a: [], b: []}
            for alpha in e.interpolation_alphas:
                emb = alpha * u_a + (1 - alpha) * u_b  # (*shape)
                images = models.generate(model, prompts, seeds, emb, settings)
                for name, reward in by_attribute.items():
                    s = reward.score(images, prompts)
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
                    if name in means:
                        means[name].append(float(s.mean()))
            for name, sign, direction in ((a, 1.0, "rises with a"), (b, -1.0, "falls with a")):
                m = monotonicity(e.interpolation_alphas, sign * np.asarray(means[name]))
                checks.append(
                    {
                        "model": model,
                        "user_a": a,
                        "user_b": b,
                        "reward": by_attribute[name].name,
                        "direction": direction,
                        "spearman": m["spearman"],
                        "max_step_against": m["max_drop"],
                        "monotone": m["monotone"],
                    }
                )
    return (
        pa.Table.from_pylist(rows, schema=INTERPOLATION),
        pa.Table.from_pylist(checks, schema=MONOTONICITY),
    )

"""The `evaluate` stage: every compared model generates for the same users, prompts and seeds; rewards
score every image; judges decide model-vs-baseline comparisons; win rates with intervals, judge
agreement with held-out labels, the interpolation study and the HTML report are written.

Who is evaluated (the design): up to ``seen_users`` seen users with held-out prompts (conditioned
on the mean of their shot sets' embeddings, or their first set: ``evaluate.seen_embedding``) and up to ``unseen_users`` unseen users, each given one 4-pair
shot set. Prompts are each user's held-out captions (never in that user's shots or training pairs).
The reward users of the `relabel` stage are not people: they appear only in the interpolation study.

Outputs (``<root>/evaluate/<fp>/``)::

    requests.parquet        user, group, shot set, prompt, seed (one row per image of every model)
    images.parquet          model, request index, PNG bytes
    rewards.parquet         model, request index, reward, score
    comparisons.parquet     judge, model vs baseline per request, outcome, primary reward of both
    win_rates.parquet       judge, group, model, baseline: win rate + interval, reward gain + interval
    win_rates_per_user.parquet
    judge_agreement.parquet judge agreement with the users' own held-out labels
    interpolation.parquet   model, pair of reward users, weight, reward, mean score
    grids/<model>.png, plots/*.png, report.html, summary.json
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ppd_core.compared import COMPARED
from ppd_core.config import PPDConfig
from ppd_core.data.fewshot import read_fewshot
from ppd_core.data.world_render import world_dir
from ppd_core.errors import StageError
from ppd_core.evaluate.generate import (
    ModelSet,
    Settings,
    averaged_users,
    embedder_for,
    user_conditions,
)
from ppd_core.stage import MapFn

REFERENCE_IMAGES = 512  # dataset images whose reward spread defines "one reward std" per user


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _world(dirs: Mapping[str, Path]):
    if "synthesize" not in dirs:
        return None
    from ppd_core.data.world_render import SyntheticWorld

    return SyntheticWorld.load(dirs["synthesize"])


# ------------------------------------------------------------------------------------------ requests


def select_requests(
    cfg: PPDConfig, fewshot_dir: Path, conditions: Mapping[int, str], exclude: set[int]
) -> pa.Table:
    """One row per (user, prompt, seed): seen users' held-out prompts, unseen users' prompts outside their
    shot set. ``conditions``: user -> conditioning shot set id (users without one are skipped)."""
    e = cfg.evaluate
    rng = np.random.default_rng(e.seed)
    pairs = read_fewshot(fewshot_dir, "eval_pairs").to_pylist()
    prompts: dict[tuple[str, int], list[str]] = {}
    for row in pairs:
        uid = int(row["user_id"])
        if uid in exclude or uid not in conditions or not row["caption"]:
            continue
        found = prompts.setdefault((row["split"], uid), [])
        if row["caption"] not in found:
            found.append(row["caption"])
    rows = []
    for group, most in (("seen", e.seen_users), ("unseen", e.unseen_users)):
        users = sorted(u for g, u in prompts if g == group)
        chosen = sorted(rng.permutation(users)[:most].tolist()) if users else []
        for uid in chosen:
            for prompt in prompts[(group, uid)][: e.prompts_per_user]:
                for seed in range(e.seeds_per_prompt):
                    rows.append(
                        {
                            "user_id": uid,
                            "group": group,
                            "shot_set_id": conditions[uid],
                            "prompt": prompt,
                            "seed": seed,
                        }
                    )
    if not rows:
        raise StageError("evaluate: no user has held-out prompts and a shot set (is the dataset too small?)")
    return pa.Table.from_pylist(rows)


def reference_images(ingest_dir: Path, n: int, seed: int) -> np.ndarray:
    """uint8 (n, H, W, 3): a seeded sample of dataset images, resized to one size."""
    from ppd_core.data.images import ingest_images

    store = ingest_images(ingest_dir)
    uids = store.uids
    chosen = np.random.default_rng(seed).permutation(len(uids))[:n]
    images = [store.get_pil(uids[i]).convert("RGB") for i in chosen]
    size = images[0].size
    return np.stack([np.asarray(im.resize(size)) for im in images])


# ------------------------------------------------------------------------------------------ shards
# Generation batches and reward-scoring batches are shards a stage can map over its workers (threads of this
# process, or Dask worker processes each on its own device). Each shard is exactly one batch of the serial
# loop it replaces (``evaluate.batch_size`` images of one model; ``scorers.BATCH_SIZE`` images of one model
# and reward), with the same per-image seeds, so the images and scores equal the serial ones bit for bit.


@dataclass(frozen=True)
class GenerateShard:
    model: str
    start: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    embeddings: np.ndarray | None  # (B, *shape) float32, None for unconditioned models


@dataclass(frozen=True)
class ScoreShard:
    model: str
    reward: str
    start: int
    images: np.ndarray  # (B, H, W, 3) uint8
    prompts: tuple[str, ...]
    users: tuple[int, ...] | None  # for a per-user reward


@dataclass(frozen=True)
class ShardWork:
    """The shard function: plain picklable values; a worker process loads the compared models and the
    rewards once (on its own device when pinned) and keeps them for its later shards."""

    cfg: PPDConfig
    dirs: tuple[tuple[str, Path], ...]
    models: tuple[str, ...]

    @property
    def key(self) -> str:
        return json.dumps(
            [self.cfg.model_dump(mode="json"), [(k, str(v)) for k, v in self.dirs], self.models]
        )

    def __call__(self, shard: GenerateShard | ScoreShard) -> tuple:
        t0 = time.perf_counter()
        if isinstance(shard, GenerateShard):
            models, lock = _process_models(self)
            with lock:  # the adapters are installed into one shared backbone: one batch at a time
                images = models.generate(
                    shard.model, shard.prompts, shard.seeds, shard.embeddings, Settings.from_config(self.cfg)
                )
            return shard.model, shard.start, images, time.perf_counter() - t0
        from ppd_core.rewards.scorers import process_reward

        dirs = dict(self.dirs)
        spec = next(s for s in self.cfg.evaluate.rewards if s.name == shard.reward)
        reward = process_reward(spec, dirs.get("tiny_models"), world_dir(dirs))
        return shard.model, shard.reward, shard.start, reward.score(shard.images, shard.prompts, shard.users)


_PROCESS_MODELS: dict[str, tuple[ModelSet, threading.Lock]] = {}
_PROCESS_MODELS_LOCK = threading.Lock()


def _process_models(work: ShardWork) -> tuple[ModelSet, threading.Lock]:
    with _PROCESS_MODELS_LOCK:
        if work.key not in _PROCESS_MODELS:
            _PROCESS_MODELS[work.key] = (
                ModelSet.load(work.cfg, dict(work.dirs), work.models),
                threading.Lock(),
            )
        return _PROCESS_MODELS[work.key]


def generate_sharded(
    work: ShardWork,
    models: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
    embeddings: Mapping[str, np.ndarray],
    settings: Settings,
    map_fn: MapFn | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every model's images (N, H, W, 3) for the requests, in batches of ``settings.batch_size``; and the
    compute seconds of each model's batches."""
    step = settings.batch_size
    shards = [
        GenerateShard(
            model,
            start,
            tuple(prompts[start : start + step]),
            tuple(int(s) for s in seeds[start : start + step]),
            embeddings[model][start : start + step] if model in embeddings else None,
        )
        for model in models
        for start in range(0, len(prompts), step)
    ]
    parts: dict[str, dict[int, np.ndarray]] = {m: {} for m in models}
    spent = dict.fromkeys(models, 0.0)
    for model, start, batch, seconds in (map_fn or map)(work, shards):
        parts[model][start] = batch
        spent[model] += seconds
    images = {m: np.concatenate([parts[m][k] for k in sorted(parts[m])]) for m in models}
    return images, {m: round(v, 2) for m, v in spent.items()}


def score_sharded(
    work: ShardWork,
    rewards: Sequence,
    images: Mapping[str, np.ndarray],
    prompts: Sequence[str],
    users: Sequence[int],
    map_fn: MapFn | None = None,
) -> dict[tuple[str, str], np.ndarray]:
    """(model, reward name) -> scores (N,) of that model's images (as :func:`judging.score_all`), in batches
    of the rewards' own batch size."""
    from ppd_core.rewards.scorers import BATCH_SIZE, process_reward

    dirs = dict(work.dirs)
    specs = {s.name: s for s in work.cfg.evaluate.rewards}
    for reward in rewards:  # loaded here already: this process's shards reuse them
        process_reward(specs[reward.name], dirs.get("tiny_models"), world_dir(dirs), loaded=reward)
    shards = [
        ScoreShard(
            model,
            reward.name,
            start,
            imgs[start : start + BATCH_SIZE],
            tuple(prompts[start : start + BATCH_SIZE]),
            tuple(int(u) for u in users[start : start + BATCH_SIZE]) if reward.per_user else None,
        )
        for model, imgs in images.items()
        for reward in rewards
        for start in range(0, len(imgs), BATCH_SIZE)
    ]
    scores = {(m, r.name): np.empty(len(imgs)) for m, imgs in images.items() for r in rewards}
    for model, reward, start, values in (map_fn or map)(work, shards):
        scores[(model, reward)][start : start + len(values)] = values
    return scores


# ------------------------------------------------------------------------------------------ stage


def evaluate_stage(
    cfg: PPDConfig,
    dirs: Mapping[str, Path],
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    map_fn: MapFn | None = None,
) -> dict:
    from ppd_core.evaluate import judging, report
    from ppd_core.evaluate.interpolate import interpolation_study
    from ppd_core.rewards.relabel import read_reward_users
    from ppd_core.rewards.scorers import load_rewards, release_process_rewards

    out_dir = Path(out_dir)
    world = _world(dirs)
    reward_users = read_reward_users(dirs["relabel"])  # reward name -> user id
    exclude = set(reward_users.values())
    models = [m.name for m in COMPARED.values() if m.train_stage is None or m.train_stage in dirs]
    models_set = ModelSet.load(cfg, dirs, models)
    by_embedder: dict[str, dict] = {}  # embedder -> user -> (first shot set id, embedding), read once each
    average = averaged_users(cfg, dirs["fewshot"])  # seen users conditioned on their sets' mean

    def conditions(embedder: str) -> dict:
        if embedder not in by_embedder:
            by_embedder[embedder] = user_conditions(dirs["embed"], embedder, average)
        return by_embedder[embedder]

    first = conditions(cfg.embed.default)
    requests = select_requests(cfg, dirs["fewshot"], {u: s for u, (s, _) in first.items()}, exclude)
    pq.write_table(requests, out_dir / "requests.parquet")
    users = requests.column("user_id").to_pylist()
    prompts = requests.column("prompt").to_pylist()
    seeds = requests.column("seed").to_pylist()
    settings = Settings.from_config(cfg)
    seconds: dict[str, float] = {}  # wall time of each phase
    clock = [time.perf_counter()]

    def mark(phase: str) -> None:
        now = time.perf_counter()
        seconds[phase] = round(now - clock[0], 2)
        clock[0] = now
        if progress:
            progress(len(seconds), len(models) + 4)

    work = ShardWork(cfg, tuple((k, Path(v)) for k, v in dirs.items()), tuple(models))
    _PROCESS_MODELS[work.key] = (models_set, threading.Lock())  # this process's shards reuse its models
    embeddings = {}
    for model in models:
        embedder = embedder_for(cfg, model)
        if embedder is not None:
            table = conditions(embedder)
            embeddings[model] = np.stack([table[u][1] for u in users])  # (N, *shape)
    try:
        images, model_seconds = generate_sharded(work, models, prompts, seeds, embeddings, settings, map_fn)
    finally:
        _PROCESS_MODELS.pop(work.key, None)  # the models stay with this body only
    for model in models:
        seconds[f"generate_{model}"] = model_seconds[model]  # compute time of its batches
    mark("generate")
    pq.write_table(
        pa.table(
            {
                "model": [m for m in models for _ in users],
                "request": [i for _ in models for i in range(len(users))],
                "png": [_png(img) for m in models for img in images[m]],
            }
        ),
        out_dir / "images.parquet",
    )

    rewards, skipped = load_rewards(cfg.evaluate.rewards, dirs.get("tiny_models"), world_dir(dirs))
    try:
        scores = score_sharded(work, rewards, images, prompts, users, map_fn)  # {(model, reward): (N,)}
    finally:
        release_process_rewards()
    pq.write_table(judging.scores_table(scores), out_dir / "rewards.parquet")
    primary = judging.primary_reward(rewards)
    ref = reference_images(dirs["ingest"], REFERENCE_IMAGES, cfg.evaluate.seed)
    reward_std = judging.reward_std(primary, ref, sorted(set(users)))  # user -> std
    mark("rewards")

    shot_sets = judging.shot_sets(dirs["fewshot"], dirs["ingest"], requests.column("shot_set_id").to_pylist())
    judges = judging.load_judges(cfg, rewards, world, dirs.get("tiny_models"))
    pairs = [(m, b) for m, b in judging.COMPARISON_PAIRS if m in images and b in images]
    comparisons = judging.compare(
        cfg, judges, pairs, requests, images, shot_sets, scores.get, primary, reward_std
    )
    pq.write_table(comparisons, out_dir / "comparisons.parquet")
    rates, per_user = judging.win_rate_tables(cfg, comparisons)
    pq.write_table(rates, out_dir / "win_rates.parquet")
    pq.write_table(per_user, out_dir / "win_rates_per_user.parquet")
    agreement = judging.agreement_table(cfg, judges, dirs, first, shot_sets)
    pq.write_table(agreement, out_dir / "judge_agreement.parquet")
    mark("judges")

    shared_prompts = list(dict.fromkeys(prompts))[: cfg.evaluate.interpolation_prompts]  # held-out, distinct
    interpolation, monotone = interpolation_study(
        cfg, models_set, conditions, reward_users, rewards, shared_prompts
    )
    pq.write_table(interpolation, out_dir / "interpolation.parquet")
    pq.write_table(monotone, out_dir / "monotonicity.parquet")
    from ppd_core.embed.probe_stage import stage1_view

    stage1 = stage1_view(dirs.get("probe"), cfg.embed.default, cfg.train.shots_ceiling_embedder)
    summary = report.summarize(cfg, rates, agreement, monotone, skipped, requests, stage1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tables = {
        "win_rates": rates,
        "win_rates_per_user": per_user,
        "interpolation": interpolation,
        "judge_agreement": agreement,
        "monotonicity": monotone,
    }
    primary_scores = (
        {}
        if primary is None
        else {m: scores[(m, primary.name)] for m in models if (m, primary.name) in scores}
    )
    report.write_report(cfg, out_dir, dirs, requests, images, summary, tables, shot_sets, primary_scores)
    mark("interpolation_and_report")
    groups = dict(zip(users, requests.column("group").to_pylist(), strict=True))  # user -> seen | unseen
    return {
        "requests": len(users),
        "users_seen": sum(g == "seen" for g in groups.values()),
        "users_unseen": sum(g == "unseen" for g in groups.values()),
        "models": models,
        "rewards": [r.name for r in rewards],
        "rewards_skipped": skipped,
        "judges": [j.name for j in judges],
        "headline": summary["headline"],
        "report": "report.html",  # relative to the stage directory
        "seconds": seconds,
    }

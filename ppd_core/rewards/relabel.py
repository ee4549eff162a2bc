"""The `relabel` stage: reward models as users, the data half of the multi-reward experiment.

For each reward named in ``relabel.rewards`` (entries of ``evaluate.rewards``), ``rows_per_reward``
ingested pairs with both images are drawn (seeded per reward name), both images are scored by the
reward with the pair's caption, and the pair is re-oriented so that the higher-scoring image wins;
exact ties are dropped and counted. Each reward becomes one user whose pairs follow that reward and
nothing else, trained on by the same PPD model as the people (the design). Only ingested
images are reused, so every downstream reader finds them in the ingest image store by uid.

It works on any source: on the synthetic world the default rewards are single world attributes
(brightness, saturation, size: stand-ins for CLIP score, aesthetic and HPS); on Pick-a-Pic they are
real reward models. A reward the environment lacks (no synthetic world, ImageReward not installed)
is skipped with its reason in the manifest counts; no reward left gives an empty but valid output.

Identities: a relabelled pair's ``pair_id`` hashes (reward name, original pair id, winner uid), so it
never collides with an ingested pair and changes when the reward orients the pair differently (shot
sets, and the embeddings keyed by them, then change too). A reward user's id is drawn per reward name
like a person's, skipping ids of real users and ids the few-shot split could make unseen
(``unseen_score < 0.5``), so a reward user is always trained on.

Output (inside ``out_dir``)::

    pairs/created_date=YYYY-MM-DD/part-00000.parquet   schema PAIRS, like ingest's (pairs/part-00000.parquet
                                                       holds the empty table when nothing was relabelled)
    reward_users.parquet                               schema REWARD_USERS: user id, reward, rows, ties
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ppd_core.config import RelabelConfig, RewardSpec
from ppd_core.data.fewshot import read_pairs, unseen_score, write_table
from ppd_core.schemas import PAIRS, PAIRS_PARTITION, REWARD_USERS
from ppd_core.stage import MapFn, Progress, ProgressCount

REWARD_USERS_FILE = "reward_users.parquet"
PAIRS_DIR = "pairs"
PAIR_ID_HEX = 20  # as ingest's pair ids
SCORE_CHUNK = 64  # images decoded and scored at a time: memory stays flat whatever rows_per_reward is
SIDES = ("winner_uid", "loser_uid")
USER_ID_RANGE = (100_000, 10_000_000)  # where the synthetic world draws its users' ids too


def needs_world(specs: Sequence[RewardSpec]) -> bool:
    return any(s.reads_world for s in specs)


def needs_tiny_models(specs: Sequence[RewardSpec]) -> bool:
    return any(s.uses_tiny_weights for s in specs)


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stream.encode())]))


def reward_user_ids(names: Sequence[str], taken: set[int], seed: int) -> dict[str, int]:
    """reward name -> user id, each drawn from its own seeded stream (adding a reward moves no other),
    skipping ids in ``taken`` (real users), ids already given, and ids the few-shot split could make unseen."""
    ids: dict[str, int] = {}
    for name in names:
        rng = _rng(seed, f"reward-user:{name}")
        while True:
            uid = int(rng.integers(*USER_ID_RANGE))
            if uid not in taken and uid not in ids.values() and unseen_score(uid) >= 0.5:
                ids[name] = uid
                break
    return ids


def relabelled_pair_id(reward: str, pair_id: str, winner_uid: str) -> str:
    return hashlib.sha256(f"{reward}|{pair_id}|{winner_uid}".encode()).hexdigest()[:PAIR_ID_HEX]


def read_reward_users(relabel_dir: str | Path) -> dict[str, int]:
    """reward name -> user id of the reward users a relabel output holds, in config order."""
    rows = pq.read_table(Path(relabel_dir) / REWARD_USERS_FILE).to_pylist()
    return {r["reward"]: int(r["user_id"]) for r in rows}


# ------------------------------------------------------------------------------------------- scoring


def _score_chunk(reward, store, uids: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
    """Scores of one chunk (at most ``SCORE_CHUNK`` images), one batched call per image shape."""
    images = [np.asarray(store.get_pil(u).convert("RGB")) for u in uids]
    out = np.empty(len(uids), dtype=np.float64)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for rows in by_shape.values():
        batch = np.stack([images[i] for i in rows])  # (B, H, W, 3) uint8
        out[rows] = reward.score(batch, [prompts[i] for i in rows])
    return out


@dataclass(frozen=True)
class ScoreShard:
    """One scoring chunk of one reward: the images of one side (winner or loser) of ``SCORE_CHUNK`` sampled
    pairs, from ``start``. The unit a stage maps over its workers."""

    reward: str
    side: str  # "winner_uid" | "loser_uid"
    start: int
    uids: tuple[str, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class ScoreWork:
    """What a scoring shard needs, as plain picklable values: each worker process loads the reward once
    (:func:`~ppd_core.rewards.scorers.process_reward`, on its own device when pinned) and the image store."""

    specs: tuple[RewardSpec, ...]
    ingest_dir: Path
    tiny_models_dir: Path | None
    world_dir: Path | None
    device: str

    def __call__(self, shard: ScoreShard) -> tuple[str, str, int, list[float]]:
        from ppd_core.data.images import ingest_images
        from ppd_core.rewards.scorers import process_reward

        spec = next(s for s in self.specs if s.name == shard.reward)
        reward = process_reward(spec, self.tiny_models_dir, self.world_dir, self.device)
        scores = _score_chunk(reward, ingest_images(self.ingest_dir), shard.uids, shard.prompts)
        return shard.reward, shard.side, shard.start, scores.tolist()  # float64 -> float: exact


def score_shards(sample: pa.Table, reward: str, prompts: Sequence[str]) -> list[ScoreShard]:
    """The scoring shards of one reward's sample: each side in chunks of ``SCORE_CHUNK``, as :func:`_score`."""
    shards = []
    for side in ("winner_uid", "loser_uid"):
        uids = sample[side].to_pylist()
        for start in range(0, len(uids), SCORE_CHUNK):
            stop = start + SCORE_CHUNK
            shards.append(
                ScoreShard(reward, side, start, tuple(uids[start:stop]), tuple(prompts[start:stop]))
            )
    return shards


def _sample(pairs: pa.Table, n: int, seed: int, name: str) -> pa.Table:
    """``n`` rows (all when fewer) drawn for one reward; ``pairs`` is sorted by pair_id, so the draw is stable."""
    chosen = np.sort(_rng(seed, f"pairs:{name}").permutation(pairs.num_rows)[:n])
    return pairs.take(pa.array(chosen, pa.int64()))


def _orient(sample: pa.Table, winner_scores: np.ndarray, loser_scores: np.ndarray, name: str, user: int):
    """PAIRS rows of one reward user: the higher-scoring image wins; (table, ties dropped)."""
    keep = winner_scores != loser_scores  # (N,) exact ties carry no label
    flip = pa.array((loser_scores > winner_scores)[keep])  # the reward disagrees with the ingested label
    t = sample.filter(pa.array(keep))
    winner = pc.if_else(flip, t["loser_uid"], t["winner_uid"])
    oriented = {
        "pair_id": [
            relabelled_pair_id(name, p, w)
            for p, w in zip(t["pair_id"].to_pylist(), winner.to_pylist(), strict=True)
        ],
        "ranking_id": t["ranking_id"],
        "user_id": pa.array([user] * t.num_rows, pa.int64()),
        "caption": t["caption"],
        "created_at": t["created_at"],
        "winner_uid": winner,
        "loser_uid": pc.if_else(flip, t["winner_uid"], t["loser_uid"]),
        "winner_model": pc.if_else(flip, t["loser_model"], t["winner_model"]),
        "loser_model": pc.if_else(flip, t["winner_model"], t["loser_model"]),
        "num_example_per_prompt": t["num_example_per_prompt"],
        "source_file": t["source_file"],  # provenance: the row the comparison was ingested from
        "source_row": t["source_row"],
    }
    return pa.table(oriented, schema=PAIRS), int((~keep).sum())


def _write_pairs(out_dir: Path, table: pa.Table) -> dict[str, int]:
    """Hive-partitioned by creation day like ingest's pairs; rows per day."""
    root = out_dir / PAIRS_DIR
    root.mkdir(parents=True, exist_ok=True)
    if table.num_rows == 0:
        write_table(root / "part-00000.parquet", PAIRS.empty_table())
        return {}
    days = pc.strftime(table["created_at"], format="%Y-%m-%d")
    written = {}
    for day in sorted(set(days.to_pylist())):
        part = table.filter(pc.equal(days, day)).sort_by("pair_id")
        write_table(root / f"{PAIRS_PARTITION}={day}" / "part-00000.parquet", part)
        written[day] = part.num_rows
    return written


# ---------------------------------------------------------------------------------------------- stage


def relabel(
    cfg: RelabelConfig,
    specs: Sequence[RewardSpec],
    ingest_dir: Path,
    out_dir: Path,
    tiny_models_dir: Path | None = None,
    world_dir: Path | None = None,
    progress: Progress | None = None,
    map_fn: MapFn | None = None,
) -> dict:
    """Stage body: relabel a sample of ingested pairs by each reward, write ``out_dir``, return counts.

    The scoring chunks (:class:`ScoreShard`) go through ``map_fn(work, shards)`` when given (an orchestrator's
    workers, results in any order), else run here one after another; the scores are the same either way.
    ``progress(done, total)`` counts the images scored (two per pair and reward)."""
    from ppd_core.data.images import has_ingest_images, ingest_images
    from ppd_core.rewards.scorers import load_rewards, process_reward, release_process_rewards

    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    pairs = read_pairs(ingest_dir)
    skipped: dict[str, str] = {}
    if has_ingest_images(ingest_dir):
        stored = pa.array(ingest_images(ingest_dir).uids, pa.string())
        with_images = pairs.filter(
            pc.and_(pc.is_in(pairs["winner_uid"], stored), pc.is_in(pairs["loser_uid"], stored))
        )
        rewards, skipped = load_rewards(specs, tiny_models_dir, world_dir, cfg.device)
    else:  # a metadata-only ingestion: nothing to score
        with_images, rewards = pairs.slice(0, 0), []
        skipped = {s.name: f"{ingest_dir} holds no images (metadata-only ingestion)" for s in specs}
    with_images = with_images.select(PAIRS.names)
    users = reward_user_ids([r.name for r in rewards], set(pairs["user_id"].to_pylist()), cfg.seed)
    by_name = {s.name: s for s in specs}
    for reward in rewards:  # this process already has them: its shards (threads, serial) reuse them
        process_reward(by_name[reward.name], tiny_models_dir, world_dir, cfg.device, loaded=reward)
    samples = {r.name: _sample(with_images, cfg.rows_per_reward, cfg.seed, r.name) for r in rewards}
    shards = [
        shard
        for name, sample in samples.items()
        for shard in score_shards(sample, name, [c or "" for c in sample["caption"].to_pylist()])
    ]
    work = ScoreWork(
        tuple(by_name[r.name] for r in rewards), ingest_dir, tiny_models_dir, world_dir, cfg.device
    )
    scores = {(r.name, side): np.empty(samples[r.name].num_rows) for r in rewards for side in SIDES}
    scored = ProgressCount(progress, 2 * sum(s.num_rows for s in samples.values()))
    try:
        for name, side, start, values in (map_fn or map)(work, shards):
            scores[(name, side)][start : start + len(values)] = values
            scored.add(len(values))
    finally:
        release_process_rewards()
    tables, rows = [], []
    for reward in rewards:
        sample = samples[reward.name]
        winner, loser = (scores[(reward.name, side)] for side in SIDES)
        table, ties = _orient(sample, winner, loser, reward.name, users[reward.name])
        tables.append(table)
        rows.append(
            {"user_id": users[reward.name], "reward": reward.name, "rows": table.num_rows, "ties": ties}
        )
    relabelled = pa.concat_tables(tables) if tables else PAIRS.empty_table()
    partitions = _write_pairs(out_dir, relabelled)
    write_table(out_dir / REWARD_USERS_FILE, pa.Table.from_pylist(rows, schema=REWARD_USERS))
    return {
        "candidate_pairs": with_images.num_rows,
        "rows": relabelled.num_rows,
        "reward_users": {r["reward"]: {k: r[k] for k in ("user_id", "rows", "ties")} for r in rows},
        "rewards_skipped": skipped,
        "partitions": partitions,
    }

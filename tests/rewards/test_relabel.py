"""The relabel stage: reward models as users, on the synthetic world and on a Pick-a-Pic Parquet source."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from ppd_core import pipeline
from ppd_core.config import RelabelConfig, RewardSpec, load_config
from ppd_core.data.fewshot import read_pairs, unseen_score
from ppd_core.data.images import ingest_images
from ppd_core.data.world_render import world_dir
from ppd_core.rewards.relabel import read_reward_users, relabel, reward_user_ids
from ppd_core.rewards.scorers import load_reward
from ppd_core.schemas import PAIRS, REWARD_USERS

TINY = [
    "world.num_users=12",
    "world.mean_pairs_per_user=20",
    "relabel.rows_per_reward=100",
]  # > SCORE_CHUNK: crosses chunks


def _config(root, *extra: str):
    return load_config(None, [f"run.root={root}", *TINY, *extra], environ={})


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """(config, outcomes) of synthesize -> ingest -> relabel -> fewshot on a tiny world."""
    cfg = _config(tmp_path_factory.mktemp("relabel"))
    return cfg, pipeline.run_stages(cfg, ["fewshot"])


def _pixels(ingest_dir, uids) -> np.ndarray:
    store = ingest_images(ingest_dir)
    return np.stack([np.asarray(store.get_pil(u).convert("RGB")) for u in uids])  # (N, H, W, 3)


def test_every_relabelled_winner_scores_higher_under_its_reward(world_run):
    cfg, out = world_run
    ingest, relabelled = out["ingest"].directory, out["relabel"].directory
    users = read_reward_users(relabelled)
    assert list(users) == list(cfg.relabel.rewards)
    pairs = read_pairs(relabelled)
    world = world_dir({"synthesize": out["synthesize"].directory})
    for spec in cfg.relabel_rewards():
        mine = pairs.filter(pairs["user_id"].to_numpy() == users[spec.name]).to_pylist()
        assert 0 < len(mine) <= cfg.relabel.rows_per_reward
        reward = load_reward(spec, world_dir=world)
        captions = [r["caption"] for r in mine]
        winners = reward.score(_pixels(ingest, [r["winner_uid"] for r in mine]), captions)
        losers = reward.score(_pixels(ingest, [r["loser_uid"] for r in mine]), captions)
        assert (winners > losers).all()


def test_outputs_follow_their_schemas_and_account_for_ties(world_run):
    cfg, out = world_run
    directory = out["relabel"].directory
    pairs = read_pairs(directory)
    assert pairs.drop(["created_date"]).schema == PAIRS
    assert len(set(pairs["pair_id"].to_pylist())) == pairs.num_rows
    assert not set(pairs["pair_id"].to_pylist()) & set(
        read_pairs(out["ingest"].directory)["pair_id"].to_pylist()
    )
    table = pq.read_table(directory / "reward_users.parquet")
    assert table.schema == REWARD_USERS
    for row in table.to_pylist():
        assert row["rows"] + row["ties"] == cfg.relabel.rows_per_reward
        assert row["rows"] == sum(u == row["user_id"] for u in pairs["user_id"].to_pylist())
    counts = out["relabel"].manifest.counts
    assert counts["rewards_skipped"] == {} and counts["rows"] == pairs.num_rows


def test_reward_users_are_new_always_seen_users_of_fewshot(world_run):
    _, out = world_run
    users = read_reward_users(out["relabel"].directory)
    people = set(read_pairs(out["ingest"].directory)["user_id"].to_pylist())
    split = {
        r["user_id"]: r["split"]
        for r in pq.read_table(out["fewshot"].directory / "users.parquet").to_pylist()
    }
    for uid in users.values():
        assert uid not in people and unseen_score(uid) >= 0.5
        assert split[uid] == "seen"


def test_relabel_is_deterministic(world_run, tmp_path):
    cfg, out = world_run
    world = world_dir({"synthesize": out["synthesize"].directory})
    again = relabel(cfg.relabel, cfg.relabel_rewards(), out["ingest"].directory, tmp_path, world_dir=world)
    assert again == out["relabel"].manifest.counts
    assert read_pairs(tmp_path).equals(read_pairs(out["relabel"].directory))


@pytest.mark.parametrize(
    "taken",
    [set(), {2_000_000}],
)
def test_reward_user_ids_depend_on_the_name_only_and_skip_taken_and_unseen_ids(taken):
    ids = reward_user_ids(["a", "b", "c"], taken, seed=0)
    assert ids == reward_user_ids(["a", "b", "c"], taken, seed=0)
    assert reward_user_ids(["c"], taken, seed=0) == {"c": ids["c"]}  # adding a reward moves no other
    assert len(set(ids.values())) == 3 and not set(ids.values()) & taken
    assert all(unseen_score(u) >= 0.5 for u in ids.values())
    blocked = reward_user_ids(["a"], {ids["a"]}, seed=0)
    assert blocked["a"] != ids["a"]


def test_unavailable_rewards_are_recorded_not_fatal(world_run, tmp_path):
    """No synthetic world for an attribute reward, no ImageReward package: an empty but valid output."""
    if importlib.util.find_spec("ImageReward") is not None:
        pytest.skip("the ImageReward package is installed here")
    _, out = world_run
    specs = (
        RewardSpec(name="brightness", kind="oracle_attribute", attribute="brightness"),
        RewardSpec(name="image-reward", kind="image_reward"),
    )
    counts = relabel(
        RelabelConfig(rewards=("brightness", "image-reward")), specs, out["ingest"].directory, tmp_path
    )
    assert set(counts["rewards_skipped"]) == {"brightness", "image-reward"}
    assert "synthetic world" in counts["rewards_skipped"]["brightness"]
    assert "ImageReward" in counts["rewards_skipped"]["image-reward"]
    assert counts["rows"] == 0 and counts["reward_users"] == {}
    assert read_pairs(tmp_path, allow_empty=True).num_rows == 0
    assert read_reward_users(tmp_path) == {}


def test_upstream_follows_the_rewards_used(tmp_path):
    world = _config(tmp_path)
    assert pipeline.upstream_of("relabel", world) == ("ingest", "synthesize")
    real = _config(tmp_path, "ingest.source=/data/pickapic", "relabel.rewards=[aesthetic]")
    assert pipeline.upstream_of("relabel", real) == ("ingest", "tiny_models")
    assert "relabel" in pipeline.upstream_of("fewshot", real) and "relabel" in pipeline.upstream_of(
        "evaluate", real
    )


def test_a_parquet_source_with_a_tiny_model_reward_gets_a_reward_user(tmp_path):
    cfg = _config(tmp_path / "world")
    source = pipeline.run_stages(cfg, ["synthesize"])["synthesize"].directory / "data"
    shutil.copytree(source, tmp_path / "pickapic")
    real = _config(
        tmp_path / "run", f"ingest.source={tmp_path / 'pickapic'}", "relabel.rewards=[aesthetic, brightness]"
    )
    out = pipeline.run_stages(real, ["fewshot"])
    assert "synthesize" not in out and "tiny_models" in out
    counts = out["relabel"].manifest.counts
    assert list(counts["reward_users"]) == ["aesthetic"] and list(counts["rewards_skipped"]) == ["brightness"]
    uid = read_reward_users(out["relabel"].directory)["aesthetic"]
    users = {r["user_id"]: r for r in pq.read_table(out["fewshot"].directory / "users.parquet").to_pylist()}
    assert (
        users[uid]["split"] == "seen"
        and users[uid]["num_pairs"] == counts["reward_users"]["aesthetic"]["rows"]
    )


def test_scoring_chunks_over_worker_processes_equal_the_serial_result(world_run, tmp_path):
    """The scoring chunks mapped over two spawned worker processes (any picklable-function executor, results
    in any order) give the serial output byte for byte."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cfg, out = world_run
    world = world_dir({"synthesize": out["synthesize"].directory})
    calls = []

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:

        def reversed_map(work, shards):
            calls.append(len(shards))
            return reversed(list(pool.map(work, shards)))

        counts = relabel(
            cfg.relabel,
            cfg.relabel_rewards(),
            out["ingest"].directory,
            tmp_path,
            world_dir=world,
            map_fn=reversed_map,
        )
    assert calls == [3 * 2 * 2]  # 3 rewards x 2 sides x 2 chunks of at most 64 of the 100 pairs
    assert counts == out["relabel"].manifest.counts
    serial = out["relabel"].directory
    for rel in out["relabel"].manifest.files:
        assert (tmp_path / rel).read_bytes() == (serial / rel).read_bytes(), rel

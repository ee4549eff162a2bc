"""Few-shot sampling (ppd_core.data.fewshot): shot sets, seen/unseen split, held-out pairs, I/O.

The invariants are checked here from the output tables alone, independently of the checks the
module runs on itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppd_core import schemas
from ppd_core.config import FewshotConfig
from ppd_core.data import fewshot
from ppd_core.errors import SchemaError, StageError

CFG = FewshotConfig(
    seed=0,
    shots=4,
    max_sets_per_user=5,
    min_pairs_per_user=8,
    unseen_fraction=0.3,
    heldout_pairs_per_user=4,
    unseen_shot_sets=2,
)
START = dt.datetime(2023, 5, 1)


def make_pairs(counts: dict[int, int], *, repeat_captions: bool = True, salt: str = "") -> pa.Table:
    """A PAIRS table: ``counts[user] = number of pairs``; captions repeat ~3 times per user."""
    rows = []
    for uid, n in counts.items():
        for i in range(n):
            pid = hashlib.sha1(f"{salt}{uid}:{i}".encode()).hexdigest()[:16]
            prompt = i % max(1, n // 3) if repeat_captions else i
            rows.append(
                {
                    "pair_id": pid,
                    "ranking_id": len(rows),
                    "user_id": uid,
                    "caption": f"a photo of thing {uid}-{prompt}",
                    "created_at": START + dt.timedelta(days=i % 3, minutes=i),
                    "winner_uid": f"w-{pid}",
                    "loser_uid": f"l-{pid}",
                    "winner_model": "m0",
                    "loser_model": "m1",
                    "num_example_per_prompt": 1,
                    "source_file": "src.parquet",
                    "source_row": len(rows),
                }
            )
    return pa.Table.from_pylist(rows, schema=schemas.PAIRS)


def thirty_users(**kw) -> pa.Table:
    counts = np.linspace(3, 120, 30).astype(int)
    return make_pairs({100 + u: int(n) for u, n in enumerate(counts)}, **kw)


def rows_by(table: pa.Table, key: str) -> dict:
    out = defaultdict(list)
    for row in table.to_pylist():
        out[row[key]].append(row)
    return out


def unseen_users(fraction: float, count: int) -> list[int]:
    return [u for u in range(10_000) if fewshot.unseen_score(u) < fraction][:count]


def seen_users(fraction: float, count: int) -> list[int]:
    return [u for u in range(10_000) if fewshot.unseen_score(u) >= fraction][:count]


def check_invariants(cfg: FewshotConfig, pairs: pa.Table, tables: dict[str, pa.Table]) -> None:
    """Every contract of the fewshot outputs, from the tables alone."""
    source = {r["pair_id"]: r for r in pairs.to_pylist()}
    users = {u["user_id"]: u for u in tables["users"].to_pylist()}
    sets = tables["shot_sets"].to_pylist()
    train = tables["train_pairs"].to_pylist()
    evals = tables["eval_pairs"].to_pylist()
    assert sorted(users) == sorted({r["user_id"] for r in source.values()})

    by_id = {s["shot_set_id"]: s for s in sets}
    assert len(by_id) == len(sets)
    in_set = {}  # pair id -> set id
    for s in sets:
        assert len(s["pair_ids"]) == cfg.shots
        blob = json.dumps(s["pair_ids"], separators=(",", ":")).encode()
        assert s["shot_set_id"] == hashlib.sha256(blob).hexdigest()[:20]
        assert s["split"] == users[s["user_id"]]["split"]
        for i, pid in enumerate(s["pair_ids"]):
            assert pid not in in_set, "sets must be disjoint"
            in_set[pid] = s["shot_set_id"]
            src = source[pid]
            assert src["user_id"] == s["user_id"]
            assert (s["captions"][i], s["winner_uids"][i], s["loser_uids"][i]) == (
                src["caption"],
                src["winner_uid"],
                src["loser_uid"],
            )
    for uid, user_sets in rows_by(tables["shot_sets"], "user_id").items():
        assert sorted(s["set_index"] for s in user_sets) == list(range(len(user_sets)))
        limit = cfg.unseen_shot_sets if users[uid]["split"] == "unseen" else cfg.max_sets_per_user
        assert len(user_sets) <= limit

    train_ids = {t["pair_id"] for t in train}
    eval_ids = {e["pair_id"] for e in evals}
    assert len(train_ids) == len(train) and len(eval_ids) == len(evals)
    assert not train_ids & eval_ids
    assert not eval_ids & set(in_set)
    for t in train:
        cond = by_id[t["shot_set_id"]]
        assert cond["user_id"] == t["user_id"]
        assert t["pair_id"] not in cond["pair_ids"]
        assert users[t["user_id"]]["split"] == "seen"
        assert (t["caption"], t["winner_uid"], t["loser_uid"]) == tuple(
            source[t["pair_id"]][k] for k in ("caption", "winner_uid", "loser_uid")
        )
    for e in evals:
        assert e["split"] == users[e["user_id"]]["split"] and e["split"] in ("seen", "unseen")
        assert source[e["pair_id"]]["user_id"] == e["user_id"]

    shown = defaultdict(set)  # user -> prompts in their shot sets
    for s in sets:
        shown[s["user_id"]].update(s["captions"])
    held = defaultdict(set)
    for e in evals:
        assert e["caption"] not in shown[e["user_id"]], "an evaluation prompt shown in the shots"
        held[e["user_id"]].add(e["caption"])
    for t in train:
        assert t["caption"] not in held[t["user_id"]], "an evaluation prompt trained on"

    for uid, rows in rows_by(pairs, "user_id").items():
        user, ids = users[uid], {r["pair_id"] for r in rows}
        assert user["num_pairs"] == len(rows)
        mine_sets = {p for p in ids if p in in_set}
        mine_train, mine_eval = ids & train_ids, ids & eval_ids
        assert (user["num_shot_sets"] * cfg.shots, user["num_train_pairs"], user["num_eval_pairs"]) == (
            len(mine_sets),
            len(mine_train),
            len(mine_eval),
        )
        if user["split"] == "excluded":
            assert not (mine_sets or mine_train or mine_eval) and user["reason"]
        elif user["split"] == "seen":
            leftover = ids - mine_train - mine_eval
            assert leftover <= mine_sets and (not leftover or user["num_shot_sets"] == 1)
            assert mine_train and mine_eval or cfg.heldout_pairs_per_user == 0
        else:
            assert not mine_train and mine_eval
            leftover = ids - mine_sets - mine_eval
            assert all(source[p]["caption"] in shown[uid] for p in leftover)


# ------------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize(
    "cfg, repeat_captions",
    [
        (CFG, True),
        (CFG, False),
        (FewshotConfig(), True),
        (CFG.model_copy(update={"shots": 1, "max_sets_per_user": 1, "min_pairs_per_user": 1}), True),
        (CFG.model_copy(update={"heldout_pairs_per_user": 0, "unseen_fraction": 0.6}), False),
        (CFG.model_copy(update={"shots": 5, "max_sets_per_user": 20, "unseen_shot_sets": 4}), True),
    ],
)
def test_output_tables_satisfy_every_invariant(cfg, repeat_captions):
    pairs = thirty_users(repeat_captions=repeat_captions)
    tables = fewshot.build_fewshot(cfg, pairs)
    assert {name: t.schema for name, t in tables.items()} == fewshot.OUTPUT_SCHEMAS
    assert tables["train_pairs"].num_rows > 0 and tables["shot_sets"].num_rows > 0
    check_invariants(cfg, pairs, tables)


def test_invariant_checker_catches_a_set_containing_its_training_pair():
    pairs = thirty_users()
    tables = fewshot.build_fewshot(CFG, pairs)
    own_set = {p: s["shot_set_id"] for s in tables["shot_sets"].to_pylist() for p in s["pair_ids"]}
    train = tables["train_pairs"].to_pylist()
    victim = next(t for t in train if t["pair_id"] in own_set)
    victim["shot_set_id"] = own_set[victim["pair_id"]]
    broken = dict(tables, train_pairs=pa.Table.from_pylist(train, schema=schemas.TRAIN_PAIRS))
    with pytest.raises(AssertionError, match="not in"):
        check_invariants(CFG, pairs, broken)


# ----------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_tables():
    pairs = thirty_users()
    first, second = fewshot.build_fewshot(CFG, pairs), fewshot.build_fewshot(CFG, pairs)
    for name in fewshot.OUTPUT_SCHEMAS:
        assert first[name].equals(second[name]), name


def test_different_seed_draws_different_sets():
    pairs = thirty_users()
    a = fewshot.build_fewshot(CFG, pairs)
    b = fewshot.build_fewshot(CFG.model_copy(update={"seed": 1}), pairs)
    assert set(a["shot_sets"]["shot_set_id"].to_pylist()) != set(b["shot_sets"]["shot_set_id"].to_pylist())
    assert set(a["eval_pairs"]["pair_id"].to_pylist()) != set(b["eval_pairs"]["pair_id"].to_pylist())


def test_users_with_equal_pair_counts_draw_independently():
    pairs = make_pairs({u: 30 for u in range(20)}, repeat_captions=False)
    tables = fewshot.build_fewshot(CFG.model_copy(update={"unseen_fraction": 0.0}), pairs)
    ranks = {}  # user -> positions, in the user's pair_id order, of their first shot set
    for s in tables["shot_sets"].to_pylist():
        if s["set_index"] == 0:
            ids = sorted(r["pair_id"] for r in pairs.to_pylist() if r["user_id"] == s["user_id"])
            ranks[s["user_id"]] = tuple(ids.index(p) for p in s["pair_ids"])
    assert len(ranks) == 20 and len(set(ranks.values())) == 20


def test_input_row_order_and_chunking_do_not_matter():
    pairs = thirty_users()
    perm = np.random.default_rng(7).permutation(pairs.num_rows)
    shuffled = pairs.take(pa.array(perm))
    chunked = pa.concat_tables([shuffled.slice(0, 100), shuffled.slice(100)])
    a, b = fewshot.build_fewshot(CFG, pairs), fewshot.build_fewshot(CFG, chunked)
    for name in fewshot.OUTPUT_SCHEMAS:
        assert a[name].equals(b[name]), name


def test_shot_set_id_is_a_content_hash_of_the_ordered_pair_ids():
    ids = ["b", "a", "c", "d"]
    blob = json.dumps(ids, separators=(",", ":")).encode()
    assert fewshot.shot_set_id(ids) == hashlib.sha256(blob).hexdigest()[:20]
    assert fewshot.shot_set_id(ids) != fewshot.shot_set_id(sorted(ids))


# --------------------------------------------------------------------------------- sets and users


@pytest.mark.parametrize("shots, max_sets", [(4, 20), (4, 3), (3, 5), (1, 2), (7, 4)])
def test_seen_users_get_min_of_floor_and_m_sets_of_exactly_k_pairs(shots, max_sets):
    cfg = CFG.model_copy(update={"shots": shots, "max_sets_per_user": max_sets, "unseen_fraction": 0.0})
    pairs = thirty_users(repeat_captions=False)
    tables = fewshot.build_fewshot(cfg, pairs)
    for user in tables["users"].to_pylist():
        if user["split"] == "excluded":
            continue
        assert user["split"] == "seen"
        expected = min((user["num_pairs"] - cfg.heldout_pairs_per_user) // shots, max_sets)
        assert user["num_shot_sets"] == expected, user
        assert user["num_eval_pairs"] == cfg.heldout_pairs_per_user
    assert all(len(ids) == shots for ids in tables["shot_sets"]["pair_ids"].to_pylist())


def test_users_below_min_pairs_are_excluded_with_the_reason():
    pairs = make_pairs({1: 3, 2: 7, 3: 8, 4: 40})
    tables = fewshot.build_fewshot(CFG.model_copy(update={"unseen_fraction": 0.0}), pairs)
    users = {u["user_id"]: u for u in tables["users"].to_pylist()}
    assert [(users[u]["split"], users[u]["reason"]) for u in (1, 2)] == [("excluded", "too_few_pairs")] * 2
    assert users[4]["split"] == "seen" and users[4]["reason"] == ""
    for name in ("shot_sets", "train_pairs", "eval_pairs"):
        assert not {1, 2} & set(tables[name]["user_id"].to_pylist())


@pytest.mark.parametrize(
    "num_pairs, split, reason, sets, train, evals",
    [
        (6, "excluded", "too_few_pairs_seen", 0, 0, 0),  # 2 held out, 4 left: one set, nothing to train
        (8, "seen", "", 1, 2, 2),  # one set: its 4 pairs have no other set and are dropped
        (10, "seen", "", 2, 8, 2),  # two sets condition each other
    ],
)
def test_seen_user_with_few_pairs(num_pairs, split, reason, sets, train, evals):
    cfg = CFG.model_copy(
        update={"min_pairs_per_user": 1, "heldout_pairs_per_user": 2, "unseen_fraction": 0.0}
    )
    tables = fewshot.build_fewshot(cfg, make_pairs({7: num_pairs, 8: 30}, repeat_captions=False))
    user = next(u for u in tables["users"].to_pylist() if u["user_id"] == 7)
    got = (
        user["split"],
        user["reason"],
        user["num_shot_sets"],
        user["num_train_pairs"],
        user["num_eval_pairs"],
    )
    assert got == (split, reason, sets, train, evals)
    counts = fewshot.summarize(cfg, tables)
    assert counts["train_pairs_dropped_no_conditioning"] == (4 if num_pairs == 8 else 0)


@pytest.mark.parametrize(
    "num_pairs, split, reason, sets, evals",
    [
        (4, "excluded", "too_few_pairs_unseen", 0, 0),  # one set and nothing left to evaluate
        (5, "unseen", "", 1, 1),
        (8, "unseen", "", 1, 4),  # two sets would leave no evaluation pair: use one
        (9, "unseen", "", 2, 1),
        (40, "unseen", "", 2, 32),
    ],
)
def test_unseen_user_sets_and_evaluation_pairs(num_pairs, split, reason, sets, evals):
    cfg = CFG.model_copy(update={"min_pairs_per_user": 1})
    uid = unseen_users(cfg.unseen_fraction, 1)[0]
    tables = fewshot.build_fewshot(cfg, make_pairs({uid: num_pairs, 10_001: 30}, repeat_captions=False))
    user = next(u for u in tables["users"].to_pylist() if u["user_id"] == uid)
    got = (
        user["split"],
        user["reason"],
        user["num_shot_sets"],
        user["num_train_pairs"],
        user["num_eval_pairs"],
    )
    assert got == (split, reason, sets, 0, evals)


def test_unseen_user_evaluation_skips_prompts_shown_in_the_shots():
    cfg = CFG.model_copy(update={"min_pairs_per_user": 1, "unseen_shot_sets": 1})
    uid = unseen_users(cfg.unseen_fraction, 1)[0]
    pairs = make_pairs({uid: 30})  # 10 prompts, 3 pairs each
    tables = fewshot.build_fewshot(cfg, pairs)
    check_invariants(cfg, pairs, tables)
    shown = set(tables["shot_sets"]["captions"].to_pylist()[0])
    eval_captions = set(tables["eval_pairs"]["caption"].to_pylist())
    assert eval_captions and not eval_captions & shown
    counts = fewshot.summarize(cfg, tables)
    assert counts["eval_pairs_dropped_shot_caption"] == 30 - 4 - tables["eval_pairs"].num_rows > 0


def test_pairs_sharing_a_held_out_prompt_are_evaluation_pairs():
    cfg = CFG.model_copy(update={"unseen_fraction": 0.0})
    pairs = make_pairs({5: 60})  # 20 prompts, 3 pairs each
    tables = fewshot.build_fewshot(cfg, pairs)
    eval_captions = set(tables["eval_pairs"]["caption"].to_pylist())
    same_prompt = [r["pair_id"] for r in pairs.to_pylist() if r["caption"] in eval_captions]
    assert sorted(same_prompt) == sorted(tables["eval_pairs"]["pair_id"].to_pylist())
    assert tables["eval_pairs"].num_rows > cfg.heldout_pairs_per_user


def test_training_pairs_prefer_a_conditioning_set_without_their_prompt():
    cfg = CFG.model_copy(update={"unseen_fraction": 0.0})
    tables = fewshot.build_fewshot(cfg, thirty_users())
    sets = rows_by(tables["shot_sets"], "user_id")
    clean, forced = 0, 0  # pairs with a prompt-free choice / pairs whose every allowed set shows the prompt
    for t in tables["train_pairs"].to_pylist():
        allowed = [s for s in sets[t["user_id"]] if t["pair_id"] not in s["pair_ids"]]
        chosen = next(s for s in allowed if s["shot_set_id"] == t["shot_set_id"])
        if any(t["caption"] not in s["captions"] for s in allowed):
            assert t["caption"] not in chosen["captions"]
            clean += 1
        else:
            forced += 1
    assert clean > 100
    assert fewshot.summarize(cfg, tables)["train_pairs_conditioned_on_same_caption"] == forced


def test_conditioning_sets_are_spread_over_a_users_sets():
    cfg = CFG.model_copy(update={"unseen_fraction": 0.0})
    tables = fewshot.build_fewshot(cfg, make_pairs({3: 200}, repeat_captions=False))
    used = set(tables["train_pairs"]["shot_set_id"].to_pylist())
    assert used == set(tables["shot_sets"]["shot_set_id"].to_pylist()) and len(used) == cfg.max_sets_per_user


# ------------------------------------------------------------------------------ seen/unseen split


def test_unseen_fraction_is_roughly_respected():
    pairs = make_pairs({u: 10 for u in range(2000)}, repeat_captions=False)
    users = fewshot.build_fewshot(CFG, pairs)["users"].to_pylist()
    unseen = sum(u["split"] == "unseen" for u in users)
    assert all(u["split"] in ("seen", "unseen") for u in users)
    assert abs(unseen / len(users) - CFG.unseen_fraction) < 0.04


def test_unseen_split_is_a_pinned_hash_of_the_user_id():
    # Golden: changing the split hash would silently move users between seen and unseen.
    assert [u for u in range(40) if fewshot.unseen_score(u) < 0.3] == [
        8,
        10,
        11,
        12,
        14,
        19,
        24,
        26,
        27,
        30,
        35,
        38,
        39,
    ]


def test_split_is_stable_when_users_are_added_and_across_seeds():
    base = thirty_users(repeat_captions=False)
    more = pa.concat_tables([base, make_pairs({9000 + u: 50 for u in range(40)}, salt="new")])

    def splits(cfg, pairs):
        return {u["user_id"]: u["split"] for u in fewshot.build_fewshot(cfg, pairs)["users"].to_pylist()}

    before = splits(CFG, base)
    after = splits(CFG, more)
    assert {u: after[u] for u in before} == before
    assert splits(CFG.model_copy(update={"seed": 5}), base) == before
    assert {"seen", "unseen"} <= set(after.values())


def test_adding_users_leaves_existing_users_outputs_unchanged():
    base = thirty_users()
    new = make_pairs({5000 + u: n for u, n in enumerate((12, 40, 90))}, salt="new")
    a, b = fewshot.build_fewshot(CFG, base), fewshot.build_fewshot(CFG, pa.concat_tables([new, base]))
    old_users = set(base["user_id"].to_pylist())
    for name in fewshot.OUTPUT_SCHEMAS:
        rows = [r for r in b[name].to_pylist() if r["user_id"] in old_users]
        assert rows == a[name].to_pylist(), name
    assert b["shot_sets"].num_rows > a["shot_sets"].num_rows


# ------------------------------------------------------------------------ stability under new days


def dated_pairs(counts: dict[int, int], days: int, salt: str = "") -> pa.Table:
    """Like ``make_pairs`` (captions repeat), each pair on a pseudo-random one of ``days`` days."""
    table = make_pairs(counts, salt=salt)
    when = [
        START + dt.timedelta(days=int(hashlib.sha1(p.encode()).hexdigest(), 16) % days, hours=1)
        for p in table["pair_id"].to_pylist()
    ]
    return table.set_column(
        table.schema.get_field_index("created_at"), "created_at", pa.array(when, pa.timestamp("ns"))
    )


def up_to(pairs: pa.Table, day: int) -> pa.Table:
    """The pairs created before day ``day`` (counted from START)."""
    return pairs.filter(
        pa.compute.less(pairs["created_at"], pa.scalar(START + dt.timedelta(days=day), pa.timestamp("ns")))
    )


@pytest.mark.parametrize(
    "cfg", [CFG, FewshotConfig(), CFG.model_copy(update={"unseen_fraction": 0.6, "shots": 3})]
)
def test_later_days_keep_every_existing_set_and_form_new_ones(cfg):
    counts = {200 + u: n for u, n in enumerate(np.linspace(5, 160, 40).astype(int))}
    pairs = dated_pairs(counts, days=15)
    steps = [fewshot.build_fewshot(cfg, up_to(pairs, d)) for d in (5, 10, 11, 15)]
    for before, after in zip(steps[:-1], steps[1:], strict=True):
        old, new = (rows_by(t["shot_sets"], "shot_set_id") for t in (before, after))
        assert all(new[sid] == rows for sid, rows in old.items()), "an existing set changed or vanished"
        assert len(new) > len(old)
        split = {u["user_id"]: u["split"] for u in after["users"].to_pylist()}
        for u in before["users"].to_pylist():
            assert u["split"] in ("excluded", split[u["user_id"]])
        # a seen user's evaluation pairs stay evaluation pairs (never trained on, never in a later set)
        new_eval = set(after["eval_pairs"]["pair_id"].to_pylist())
        old_eval = [e for e in before["eval_pairs"].to_pylist() if e["split"] == "seen"]
        assert old_eval and all(e["pair_id"] in new_eval for e in old_eval)
    # one pass over all days gives what growing day by day gave
    final = fewshot.build_fewshot(cfg, pairs)
    for name in fewshot.OUTPUT_SCHEMAS:
        assert final[name].equals(steps[-1][name]), name


def test_sets_follow_creation_days_and_a_seeded_order_within_a_day():
    cfg = CFG.model_copy(update={"unseen_fraction": 0.0, "heldout_pairs_per_user": 0})
    pairs = dated_pairs({7: 60}, days=6)
    day = {r["pair_id"]: r["created_at"].date() for r in pairs.to_pylist()}
    sets = fewshot.build_fewshot(cfg, pairs)["shot_sets"].sort_by("set_index").to_pylist()
    flat = [p for s in sets for p in s["pair_ids"]]
    assert [day[p] for p in flat] == sorted(day[p] for p in flat)  # earlier days first
    first_day = [p for p in flat if day[p] == min(day.values())]
    assert first_day == sorted(first_day, key=lambda p: fewshot.order_key(cfg.seed, p))
    other = fewshot.build_fewshot(cfg.model_copy(update={"seed": 3}), pairs)["shot_sets"]
    assert set(other["shot_set_id"].to_pylist()) != {s["shot_set_id"] for s in sets}


# ------------------------------------------------------------------------------------ bad input


def test_duplicate_pair_ids_are_rejected():
    pairs = thirty_users()
    with pytest.raises(StageError, match="more than once"):
        fewshot.build_fewshot(CFG, pa.concat_tables([pairs, pairs.slice(0, 2)]))


def test_missing_column_is_a_schema_error():
    with pytest.raises(SchemaError, match="winner_uid"):
        fewshot.build_fewshot(CFG, thirty_users().drop_columns(["winner_uid"]))


def test_empty_pairs_table_is_a_stage_error():
    with pytest.raises(StageError, match="empty"):
        fewshot.build_fewshot(CFG, schemas.PAIRS.empty_table())


def test_every_user_excluded_is_a_stage_error():
    with pytest.raises(StageError, match="min_pairs_per_user"):
        fewshot.build_fewshot(CFG, make_pairs({1: 3, 2: 5}))


# ------------------------------------------------------------------------------------------- I/O


def write_hive(pairs: pa.Table, ingest_dir: Path) -> None:
    dates = [ts.date().isoformat() for ts in pairs["created_at"].to_pylist()]
    for date in sorted(set(dates)):
        part = pairs.filter(pa.array([d == date for d in dates]))
        out = ingest_dir / "pairs" / f"created_date={date}"
        out.mkdir(parents=True)
        half = part.num_rows // 2
        pq.write_table(part.slice(0, half), out / "part-0.parquet")
        pq.write_table(part.slice(half), out / "part-1.parquet")


def test_read_pairs_reads_hive_partitions_sorted_by_pair_id(tmp_path):
    pairs = thirty_users()
    write_hive(pairs, tmp_path)
    table = fewshot.read_pairs(tmp_path)
    assert table.num_rows == pairs.num_rows
    assert table.schema.field("created_date").type == pa.string()
    ids = table["pair_id"].to_pylist()
    assert ids == sorted(ids) and set(ids) == set(pairs["pair_id"].to_pylist())
    dates = {r["pair_id"]: r["created_at"].date().isoformat() for r in pairs.to_pylist()}
    assert all(dates[r["pair_id"]] == r["created_date"] for r in table.to_pylist())


def test_read_pairs_missing_or_empty_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="run the ingest stage"):
        fewshot.read_pairs(tmp_path)
    part = tmp_path / "pairs" / "created_date=2023-05-01"
    part.mkdir(parents=True)
    with pytest.raises(StageError, match="empty"):
        fewshot.read_pairs(tmp_path)
    pq.write_table(schemas.PAIRS.empty_table(), part / "part-0.parquet")
    with pytest.raises(StageError, match="empty"):
        fewshot.read_pairs(tmp_path)


def test_sample_fewshot_writes_four_tables_with_exact_schemas(tmp_path):
    pairs = thirty_users()
    write_hive(pairs, tmp_path / "ingest")
    counts = fewshot.sample_fewshot(CFG, tmp_path / "ingest", tmp_path / "out")

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{name}.parquet" for name in fewshot.OUTPUT_SCHEMAS
    )
    expected = fewshot.build_fewshot(CFG, pairs)
    for name, schema in fewshot.OUTPUT_SCHEMAS.items():
        table = pq.read_table(tmp_path / "out" / f"{name}.parquet")
        assert table.schema.equals(schema), name
        assert table.equals(expected[name]), name

    assert json.loads(json.dumps(counts)) == counts
    users = expected["users"].to_pylist()
    assert counts["pairs_in"] == pairs.num_rows
    assert counts["users_seen"] == sum(u["split"] == "seen" for u in users)
    assert counts["users_unseen"] == sum(u["split"] == "unseen" for u in users)
    assert sum(counts["users_excluded"].values()) == sum(u["split"] == "excluded" for u in users)
    assert counts["users_excluded"]["too_few_pairs"] == sum(
        u["num_pairs"] < CFG.min_pairs_per_user for u in users
    )
    assert sum(counts["shot_sets"].values()) == expected["shot_sets"].num_rows
    assert counts["train_pairs"] == expected["train_pairs"].num_rows
    assert sum(counts["eval_pairs"].values()) == expected["eval_pairs"].num_rows

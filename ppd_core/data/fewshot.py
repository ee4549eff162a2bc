"""Few-shot sampling: per-user shot sets, the seen/unseen split and held-out evaluation pairs.

Owns the ``fewshot`` stage (the design; the paper). From the
ingested ``pairs`` table plus the ``relabel`` stage's (its reward users, same schema) it draws, for
every user with at least ``min_pairs_per_user`` pairs, from the user's pairs in their **order**
(creation day, then a seeded hash of the pair id within the day):

- **seen** users: the first ``heldout_pairs_per_user`` pairs are evaluation pairs (with every later
  pair that shares a prompt with one of them); the other pairs are cut, in order, into consecutive
  chunks of ``shots`` (an incomplete last chunk waits for more pairs, at most ``max_sets_per_user``);
  every non-evaluation pair is a training pair conditioned on one of the user's shot sets that does
  not contain it. A pair whose only set is its own is dropped.
- **unseen** users: the first (up to ``unseen_shot_sets``) chunks of ``shots`` pairs are shot sets, as
  many as leave at least one evaluation pair; every other pair is an evaluation pair.

Stability under appended days (the set rule)
- A user's order only grows at its end when a later day is added, and every choice above is a
  prefix of that order (held-out pairs, then chunks in order), so adding days never changes a set
  that exists: a user's existing shot sets stay exactly as they were and new pairs form new sets
  (set ``j`` is always the ``j``-th chunk). Their content-hash ids, which key embeddings downstream,
  stay put, so a run over more days embeds only the new sets, and a run over all days at once
  gives the same sets as one that grew day by day. Adding or removing *other* users, or
  reordering the input, changes nothing either. A day that changes (re-ingested with other rows)
  can change the sets holding its pairs and later ones; earlier days' sets stay.
- Seen/unseen is decided by a hash of ``"unseen:{user_id}"`` mapped to [0, 1) and compared with
  ``unseen_fraction``: it never changes as a user's pairs grow. It does not depend on ``cfg.seed``:
  redrawing shots with another seed keeps the same users held out, so results across seeds compare
  the same populations. Raising the fraction only moves users from seen to unseen.
- The seed orders the pairs within a day (``order_key``) and draws each training pair's
  conditioning set (a hash of the seed and the pair id), so the draws depend on nothing else.

Prompt hygiene (the paper: "never evaluate on prompts in the 4 shots"). Captions are
compared after case folding and collapsing whitespace; empty captions never match.
- Seen users: every pair sharing a caption with a held-out pair is an evaluation pair too, so
  an evaluation prompt is never trained on nor shown in a shot set of the same user.
- Unseen users: a remaining pair whose caption appears in the user's shot sets is not used for
  evaluation (counted as ``eval_pairs_dropped_shot_caption``).
- A training pair is conditioned, when possible, on a set without its caption.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ppd_core import schemas
from ppd_core.config import FewshotConfig
from ppd_core.data.union import pairs_roots
from ppd_core.errors import SchemaError, StageError
from ppd_core.manifest import atomic_write_bytes
from ppd_core.stage import Progress, ProgressCount

SEEN, UNSEEN, EXCLUDED = "seen", "unseen", "excluded"
TOO_FEW_PAIRS = "too_few_pairs"  # fewer than min_pairs_per_user
TOO_FEW_PAIRS_SEEN = "too_few_pairs_seen"  # seen, but no shot set or no conditioned training pair
TOO_FEW_PAIRS_UNSEEN = "too_few_pairs_unseen"  # unseen, but not one set plus one evaluation pair
UNSEEN_SALT = "unseen"  # the split hashes f"{UNSEEN_SALT}:{user_id}", independent of cfg.seed
SHOT_SET_ID_CHARS = 20
PROGRESS_USERS = 256  # users planned between two progress reports
OUTPUT_SCHEMAS = {
    "shot_sets": schemas.SHOT_SETS,
    "train_pairs": schemas.TRAIN_PAIRS,
    "eval_pairs": schemas.EVAL_PAIRS,
    "users": schemas.FEWSHOT_USERS,
}
REQUIRED_COLUMNS = ("pair_id", "user_id", "caption", "winner_uid", "loser_uid", "created_at")
NOT_NULL_COLUMNS = ("pair_id", "user_id", "winner_uid", "loser_uid", "created_at")
_NS_PER_DAY = 86_400 * 10**9


# ------------------------------------------------------------------------------------ identities


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def order_key(seed: int, pair_id: str) -> int:
    """A pair's place among its user's pairs of the same creation day (a seeded hash of the pair id)."""
    return _hash_int(f"fewshot:{seed}:{pair_id}")


def conditioning_draw(seed: int, pair_id: str) -> float:
    """Uniform-looking number in [0, 1) that picks a training pair's conditioning set."""
    return _hash_int(f"condition:{seed}:{pair_id}") / 2**64


def subset_key(seed: int, pair_id: str, shot_set_id: str = "") -> int:
    """``train.conditioning = user_subset``: with no set, the number that sizes a training pair's subset of its
    user's other shot sets; with a set, that set's place among those the subset may add (seeded hashes)."""
    return _hash_int(f"subset:{seed}:{pair_id}:{shot_set_id}")


def unseen_score(user_id: int) -> float:
    """Stable uniform-looking number in [0, 1); the user is unseen when it is < unseen_fraction."""
    return _hash_int(f"{UNSEEN_SALT}:{user_id}") / 2**64


def shot_set_id(pair_ids: list[str]) -> str:
    """Content hash of the ordered pair ids (order matters: it is the prompt order)."""
    blob = json.dumps(list(pair_ids), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:SHOT_SET_ID_CHARS]


def caption_key(caption: str | None) -> str | None:
    """Prompt identity for hygiene checks; None (matches nothing) for an empty caption."""
    key = " ".join((caption or "").split()).casefold()
    return key or None


# ------------------------------------------------------------------------------------------- input


def _check_columns(table: pa.Table, where: object) -> None:
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            raise SchemaError(f"{where}: pairs table has no column {name!r} (columns: {table.column_names})")
        want = schemas.PAIRS.field(name).type
        if table.schema.field(name).type != want:
            raise SchemaError(f"{where}: column {name!r} is {table.schema.field(name).type}, expected {want}")


def read_pairs(stage_dir: Path, allow_empty: bool = False) -> pa.Table:
    """A stage's ``pairs`` table (ingest's or relabel's; hive-partitioned by ``created_date``), sorted by
    pair_id. The ingest output of a partitioned run is read as the union of its days' tables."""
    roots = pairs_roots(stage_dir)
    where = roots[0] if len(roots) == 1 else Path(stage_dir)
    missing = [r for r in roots if not r.is_dir()]
    if missing:
        raise StageError(f"no pairs table at {missing[0]}: run the ingest stage (or relabel) first")
    partitioning = ds.partitioning(pa.schema([(schemas.PAIRS_PARTITION, pa.string())]), flavor="hive")
    try:
        tables = [ds.dataset(r, format="parquet", partitioning=partitioning).to_table() for r in roots]
        table = pa.concat_tables(tables, promote_options="none") if tables else schemas.PAIRS.empty_table()
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(f"{where}: cannot read the pairs table: {e}") from e
    if table.num_rows == 0 and not allow_empty:
        raise StageError(f"{where}: the pairs table is empty (no rows in any partition)")
    _check_columns(table, where)
    return table.sort_by([("pair_id", "ascending"), ("user_id", "ascending")])


def _check_values(pairs: pa.Table) -> None:
    for name in NOT_NULL_COLUMNS:
        if pairs[name].null_count:
            raise StageError(f"pairs: {pairs[name].null_count} rows have a null {name}")
    if pc.count_distinct(pairs["pair_id"]).as_py() != pairs.num_rows:
        counts = pc.value_counts(pairs["pair_id"])
        dups = [c["values"] for c in counts.to_pylist() if c["counts"] > 1]
        raise StageError(f"pairs: {len(dups)} pair ids occur more than once (e.g. {dups[:3]})")


# ------------------------------------------------------------------------------------------ planning


@dataclass
class _UserPlan:
    """One user's draw, as positions into the pairs table in order (user_id, day, order key)."""

    user_id: int
    positions: list[int]
    split: str
    reason: str = ""
    sets: list[list[int]] = field(default_factory=list)  # each in prompt order
    train: list[tuple[int, int]] = field(default_factory=list)  # (position, conditioning set index)
    eval: list[int] = field(default_factory=list)
    dropped_no_conditioning: int = 0
    dropped_shot_caption: int = 0

    def exclude(self, reason: str) -> _UserPlan:
        self.split, self.reason, self.sets, self.train, self.eval = EXCLUDED, reason, [], [], []
        self.dropped_no_conditioning = self.dropped_shot_caption = 0
        return self


def _chunks(items: list[int], size: int, count: int) -> list[list[int]]:
    return [items[i * size : (i + 1) * size] for i in range(count)]


def _plan_seen(cfg: FewshotConfig, plan: _UserPlan, order: list[int], keys: list, draws: list) -> _UserPlan:
    n_held = min(cfg.heldout_pairs_per_user, len(order))
    held_keys = {keys[p] for p in order[:n_held]} - {None}
    plan.eval, rest = list(order[:n_held]), []
    for p in order[n_held:]:  # a pair sharing a held-out prompt is evaluation too
        (plan.eval if keys[p] in held_keys else rest).append(p)
    plan.sets = _chunks(rest, cfg.shots, min(len(rest) // cfg.shots, cfg.max_sets_per_user))
    n_sets = len(plan.sets)
    own_set = {p: j for j, s in enumerate(plan.sets) for p in s}
    sets_with_key: dict[str, set[int]] = {}
    for j, s in enumerate(plan.sets):
        for p in s:
            if keys[p] is not None:
                sets_with_key.setdefault(keys[p], set()).add(j)
    # Each training pair draws its conditioning set among the user's sets that do not contain it,
    # preferring sets that do not show its prompt either (the situation evaluation will be in).
    for p in rest:
        u = draws[p]
        own, avoid = own_set.get(p), sets_with_key.get(keys[p], ())
        if own is None and not avoid:
            pool: Sequence[int] = range(n_sets)
        else:
            allowed = [j for j in range(n_sets) if j != own]
            pool = [j for j in allowed if j not in avoid] or allowed
        if not pool:
            plan.dropped_no_conditioning += 1
            continue
        plan.train.append((p, pool[int(u * len(pool))]))
    if not plan.train:
        return plan.exclude(TOO_FEW_PAIRS_SEEN)
    plan.eval.sort()
    plan.train.sort()
    return plan


def _plan_unseen(cfg: FewshotConfig, plan: _UserPlan, order: list[int], keys: list) -> _UserPlan:
    most = min(cfg.unseen_shot_sets, cfg.max_sets_per_user, len(order) // cfg.shots)
    for n_sets in range(most, 0, -1):  # fewer sets until one evaluation pair remains
        shots, rest = order[: n_sets * cfg.shots], order[n_sets * cfg.shots :]
        shot_keys = {keys[p] for p in shots} - {None}
        evals = [p for p in rest if keys[p] not in shot_keys]
        if evals:
            plan.sets = _chunks(shots, cfg.shots, n_sets)
            plan.eval = sorted(evals)
            plan.dropped_shot_caption = len(rest) - len(evals)
            return plan
    return plan.exclude(TOO_FEW_PAIRS_UNSEEN)


def _plan_user(cfg: FewshotConfig, user_id: int, positions: list[int], keys: list, draws: list) -> _UserPlan:
    """One user's draw; ``positions`` are already in the user's order (day, then order key)."""
    plan = _UserPlan(user_id, positions, SEEN)
    if len(positions) < cfg.min_pairs_per_user:
        return plan.exclude(TOO_FEW_PAIRS)
    if unseen_score(user_id) < cfg.unseen_fraction:
        plan.split = UNSEEN
        return _plan_unseen(cfg, plan, positions, keys)
    return _plan_seen(cfg, plan, positions, keys, draws)


def _in_order(cfg: FewshotConfig, pairs: pa.Table) -> pa.Table:
    """The pairs sorted by user, creation day (UTC) and the seeded order key within the day."""
    pairs = pairs.sort_by([("pair_id", "ascending")])  # a canonical start: ties keep this order
    pair_ids = pairs["pair_id"].to_pylist()
    ns = pc.cast(pairs["created_at"], pa.int64()).to_numpy(zero_copy_only=False)
    day = np.floor_divide(ns, _NS_PER_DAY)
    key = np.fromiter((order_key(cfg.seed, p) for p in pair_ids), dtype=np.uint64, count=len(pair_ids))
    order = np.lexsort((key, day, pairs["user_id"].to_numpy()))
    return pairs.take(pa.array(order))


# ------------------------------------------------------------------------------------------ assembly


def _assemble(pairs: pa.Table, plans: list[_UserPlan]) -> dict[str, pa.Table]:
    pair_ids = pairs["pair_id"].to_pylist()
    live = [p for p in plans if p.split != EXCLUDED]
    set_rows = [(plan, j, s) for plan in live for j, s in enumerate(plan.sets)]
    set_ids = [shot_set_id([pair_ids[p] for p in s]) for _, _, s in set_rows]
    flat = pa.array([p for _, _, s in set_rows for p in s], pa.int64())
    offsets = pa.array(np.cumsum([0] + [len(s) for _, _, s in set_rows]), pa.int32())

    def listed(name: str) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pc.take(pairs[name], flat).combine_chunks())

    shot_sets = pa.Table.from_arrays(
        [
            pa.array(set_ids, pa.string()),
            pa.array([plan.user_id for plan, _, _ in set_rows], pa.int64()),
            pa.array([plan.split for plan, _, _ in set_rows], pa.string()),
            pa.array([j for _, j, _ in set_rows], pa.int32()),
            listed("pair_id"),
            listed("caption"),
            listed("winner_uid"),
            listed("loser_uid"),
        ],
        schema=schemas.SHOT_SETS,
    )
    first_set = np.cumsum([0] + [len(plan.sets) for plan in live])
    train = [(p, set_ids[first_set[i] + j]) for i, plan in enumerate(live) for p, j in plan.train]
    train_pairs = pairs.take(pa.array([p for p, _ in train], pa.int64())).select(
        ["pair_id", "user_id", "caption", "winner_uid", "loser_uid"]
    )
    train_pairs = train_pairs.append_column("shot_set_id", pa.array([s for _, s in train], pa.string()))
    evals = [(p, plan.split) for plan in live for p in plan.eval]
    eval_pairs = pairs.take(pa.array([p for p, _ in evals], pa.int64()))
    eval_pairs = eval_pairs.append_column("split", pa.array([s for _, s in evals], pa.string()))
    users = pa.Table.from_pylist(
        [
            {
                "user_id": plan.user_id,
                "split": plan.split,
                "reason": plan.reason,
                "num_pairs": len(plan.positions),
                "num_shot_sets": len(plan.sets),
                "num_train_pairs": len(plan.train),
                "num_eval_pairs": len(plan.eval),
            }
            for plan in plans
        ],
        schema=schemas.FEWSHOT_USERS,
    )
    return {
        "shot_sets": shot_sets,
        "train_pairs": train_pairs.select(schemas.TRAIN_PAIRS.names).cast(schemas.TRAIN_PAIRS),
        "eval_pairs": eval_pairs.select(schemas.EVAL_PAIRS.names).cast(schemas.EVAL_PAIRS),
        "users": users,
    }


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"fewshot invariant broken: {message}")


def _columns(table: pa.Table, *names: str) -> list[list]:
    return [table[name].to_pylist() for name in names]


def _check_invariants(cfg: FewshotConfig, tables: dict[str, pa.Table], plans: list[_UserPlan]) -> None:
    """Checks on the emitted tables (plus coverage from the plans). A failure is a bug here."""
    set_ids, set_users, set_pair_ids, set_captions = _columns(
        tables["shot_sets"], "shot_set_id", "user_id", "pair_ids", "captions"
    )
    set_pairs = dict(zip(set_ids, set_pair_ids, strict=True))
    set_user = dict(zip(set_ids, set_users, strict=True))
    in_sets = {p for ids in set_pair_ids for p in ids}
    _require(len(set_pairs) == len(set_ids), "duplicate shot_set_id")
    _require(all(len(ids) == cfg.shots for ids in set_pair_ids), f"a shot set without {cfg.shots} pairs")
    _require(len(in_sets) == sum(map(len, set_pair_ids)), "a pair in two shot sets")
    train_ids, train_users, train_captions, train_sets = _columns(
        tables["train_pairs"], "pair_id", "user_id", "caption", "shot_set_id"
    )
    eval_ids, eval_users, eval_captions = _columns(tables["eval_pairs"], "pair_id", "user_id", "caption")
    _require(len(set(eval_ids)) == len(eval_ids), "a duplicated evaluation pair")
    _require(len(set(train_ids)) == len(train_ids), "a duplicated training pair")
    _require(not set(eval_ids) & in_sets, "an evaluation pair inside a shot set")
    _require(not set(eval_ids) & set(train_ids), "an evaluation pair among training pairs")
    for pid, uid, sid in zip(train_ids, train_users, train_sets, strict=True):
        _require(set_user.get(sid) == uid, f"training pair {pid} conditioned on another user's (or no) set")
        _require(pid not in set_pairs[sid], f"training pair {pid} conditioned on a set containing it")
    shown: dict[int, set] = {}  # user -> prompts shown in their shot sets
    for uid, caps in zip(set_users, set_captions, strict=True):
        shown.setdefault(uid, set()).update(caption_key(c) for c in caps)
    held: dict[int, set] = {}  # user -> evaluation prompts
    for uid, cap in zip(eval_users, eval_captions, strict=True):
        key = caption_key(cap)
        _require(
            key is None or key not in shown.get(uid, ()), f"user {uid}: an evaluation prompt in a shot set"
        )
        held.setdefault(uid, set()).add(key)
    for uid, cap in zip(train_users, train_captions, strict=True):
        key = caption_key(cap)
        _require(key is None or key not in held.get(uid, ()), f"user {uid}: an evaluation prompt trained on")
    for plan in plans:
        limit = (
            min(cfg.unseen_shot_sets, cfg.max_sets_per_user)
            if plan.split == UNSEEN
            else cfg.max_sets_per_user
        )
        _require(len(plan.sets) <= limit, f"user {plan.user_id}: {len(plan.sets)} shot sets > {limit}")
        in_shots = sum(map(len, plan.sets)) if plan.split == UNSEEN else 0
        used = (
            len(plan.train)
            + len(plan.eval)
            + in_shots
            + plan.dropped_no_conditioning
            + plan.dropped_shot_caption
        )
        _require(
            plan.split == EXCLUDED or used == len(plan.positions),
            f"user {plan.user_id}: pairs unaccounted for",
        )


def build_fewshot(
    cfg: FewshotConfig, pairs: pa.Table, progress: Progress | None = None
) -> dict[str, pa.Table]:
    """Shot sets, training pairs, evaluation pairs and the per-user table; pure and deterministic.
    ``progress(done, total)`` counts the users planned, ``PROGRESS_USERS`` at a time."""
    _check_columns(pairs, "pairs")
    pairs = pairs.select(list(REQUIRED_COLUMNS))
    _check_values(pairs)
    if pairs.num_rows == 0:
        raise StageError("fewshot: the pairs table is empty")
    pairs = _in_order(cfg, pairs)
    keys = [caption_key(c) for c in pairs["caption"].to_pylist()]
    draws = [conditioning_draw(cfg.seed, p) for p in pairs["pair_id"].to_pylist()]
    user_ids = pairs["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])  # first row of each user
    ends = np.r_[starts[1:], len(user_ids)]
    planned = ProgressCount(progress, len(starts))
    plans = []
    for first in range(0, len(starts), PROGRESS_USERS):
        chunk = zip(starts[first : first + PROGRESS_USERS], ends[first : first + PROGRESS_USERS], strict=True)
        plans += [_plan_user(cfg, int(user_ids[s]), list(range(s, e)), keys, draws) for s, e in chunk]
        planned.add(len(plans) - planned.done)
    if all(plan.split == EXCLUDED for plan in plans):
        reasons = dict(Counter(plan.reason for plan in plans))
        raise StageError(
            f"fewshot: every one of {len(plans)} users is excluded ({reasons}); see min_pairs_per_user"
        )
    tables = _assemble(pairs, plans)
    _check_invariants(cfg, tables, plans)
    return tables


# --------------------------------------------------------------------------------------------- stage


def summarize(cfg: FewshotConfig, tables: dict[str, pa.Table]) -> dict:
    """JSON-able counts for the manifest, derived from the tables alone."""
    users = tables["users"].to_pylist()
    by_split = Counter(u["split"] for u in users)
    seen = [u for u in users if u["split"] == SEEN]
    unseen = [u for u in users if u["split"] == UNSEEN]
    set_captions = {
        sid: {caption_key(c) for c in caps}
        for sid, caps in zip(
            tables["shot_sets"]["shot_set_id"].to_pylist(),
            tables["shot_sets"]["captions"].to_pylist(),
            strict=True,
        )
    }
    same_caption = sum(
        1
        for cap, sid in zip(
            tables["train_pairs"]["caption"].to_pylist(),
            tables["train_pairs"]["shot_set_id"].to_pylist(),
            strict=True,
        )
        if caption_key(cap) is not None and caption_key(cap) in set_captions[sid]
    )
    sets_split = Counter(tables["shot_sets"]["split"].to_pylist())
    eval_split = Counter(tables["eval_pairs"]["split"].to_pylist())
    return {
        "pairs_in": sum(u["num_pairs"] for u in users),
        "users_seen": by_split[SEEN],
        "users_unseen": by_split[UNSEEN],
        "users_excluded": dict(sorted(Counter(u["reason"] for u in users if u["split"] == EXCLUDED).items())),
        "shot_sets": {SEEN: sets_split[SEEN], UNSEEN: sets_split[UNSEEN]},
        "train_pairs": tables["train_pairs"].num_rows,
        "eval_pairs": {SEEN: eval_split[SEEN], UNSEEN: eval_split[UNSEEN]},
        "train_pairs_dropped_no_conditioning": sum(
            u["num_pairs"] - u["num_train_pairs"] - u["num_eval_pairs"] for u in seen
        ),
        "eval_pairs_dropped_shot_caption": sum(
            u["num_pairs"] - cfg.shots * u["num_shot_sets"] - u["num_eval_pairs"] for u in unseen
        ),
        "train_pairs_conditioned_on_same_caption": same_caption,
    }


def write_table(path: Path, table: pa.Table) -> None:
    """Parquet through a temporary sibling and an atomic rename."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


FEWSHOT_TABLES = ("shot_sets", "train_pairs", "eval_pairs", "users")


def read_fewshot(fewshot_dir: str | Path, name: str, columns: list[str] | None = None) -> pa.Table:
    """One of the fewshot stage's tables (:data:`FEWSHOT_TABLES`); readers never spell its file names."""
    if name not in FEWSHOT_TABLES:
        raise ValueError(f"the fewshot stage writes {FEWSHOT_TABLES}, not {name!r}")
    return pq.read_table(Path(fewshot_dir) / f"{name}.parquet", columns=columns)


def sample_fewshot(
    cfg: FewshotConfig,
    ingest_dir: Path,
    out_dir: Path,
    relabel_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Stage body: read the ingested pairs and the relabel stage's reward users' pairs (same schema), draw
    the few-shot tables, write ``out_dir/<name>.parquet``, return counts (``progress``: users planned)."""
    pairs = read_pairs(Path(ingest_dir)).select(list(REQUIRED_COLUMNS))
    if relabel_dir is not None:
        relabelled = read_pairs(Path(relabel_dir), allow_empty=True).select(list(REQUIRED_COLUMNS))
        pairs = pa.concat_tables([pairs, relabelled])
    tables = build_fewshot(cfg, pairs, progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_table(out_dir / f"{name}.parquet", table)
    return summarize(cfg, tables)

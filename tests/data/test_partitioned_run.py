"""`ppd run --partitioned` through the installed CLI on a small synthetic world of 15 days.

10 days, then all 15: only the 5 new days are ingested, existing shot sets stay, only new sets are
embedded, and the result equals a plain (unpartitioned) run over all 15 days, bitwise. Then
``ppd status`` shows the days, and a lost day is re-ingested alone with everything downstream cached.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ppd_core.data.fewshot import read_fewshot
from ppd_core.data.union import UNION_FILE
from ppd_core.embed.extract import read_embeddings
from ppd_core.manifest import is_complete, load_manifest
from ppd_core.rewards.relabel import REWARD_USERS_FILE
from tests.test_cli import ppd, run_json

DAYS = [(dt.date(2023, 5, 1) + dt.timedelta(days=i)).isoformat() for i in range(15)]
WORLD = ["--set", "world.num_users=12", "--set", "world.mean_pairs_per_user=40", "--set", "world.days=15"]
WORLD += ["--set", "embed.embedders=[{name: clip, kind: clip_diff}]", "--set", "embed.default=clip"]


def shot_sets(fewshot_dir: str) -> dict[str, dict]:
    return {r["shot_set_id"]: r for r in read_fewshot(fewshot_dir, "shot_sets").to_pylist()}


def embeddings(embed_dir: str) -> dict[str, bytes]:
    table, emb = read_embeddings(Path(embed_dir), "clip")
    return {sid: emb[i].tobytes() for i, sid in enumerate(table.column("shot_set_id").to_pylist())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The partitioned root after 10 days and after 15, and a plain root over all 15 days (three runs, about
    100 s on 2 cores: every test that uses them is in the slow suite)."""
    base = tmp_path_factory.mktemp("partitioned")
    root = str(base / "part")
    first = run_json("--root", root, *WORLD, "--stages", "embed", "--partitioned", "--end", DAYS[9])
    manifests = {d: p.stat().st_mtime_ns for d, p in _partition_manifests(root).items()}
    second = run_json("--root", root, *WORLD, "--stages", "embed", "--partitioned")
    plain = run_json("--root", str(base / "plain"), *WORLD, "--stages", "embed")
    return root, first, manifests, second, plain


def _partition_manifests(root: str) -> dict[str, Path]:
    found = Path(root, "partitions", "ingest").glob("created_date=*/*/manifest.json")
    return {p.parent.parent.name.split("=")[1]: p for p in found}


@pytest.mark.slow
def test_only_the_new_days_are_ingested_and_the_union_names_every_day(runs):
    root, first, before, second, _ = runs
    assert first["ingest"]["partitions"]["computed"] == DAYS[:10]
    assert second["ingest"]["partitions"]["computed"] == DAYS[10:]  # exactly the 5 new days
    assert second["ingest"]["partitions"]["days"] == 15 and not second["ingest"]["partitions"]["failed"]
    after = _partition_manifests(root)
    assert sorted(after) == DAYS
    assert {d: after[d].stat().st_mtime_ns for d in DAYS[:10]} == before  # earlier days untouched

    union_dir = Path(second["ingest"]["output_dir"])
    manifest = load_manifest(union_dir)
    assert set(manifest.files) == {UNION_FILE} and is_complete(union_dir)
    entries = json.loads((union_dir / UNION_FILE).read_text())["partitions"]
    assert [e["day"] for e in entries] == DAYS
    for e in entries:
        assert load_manifest(Path(root) / e["directory"]).digest == e["digest"]
    counts = second["ingest"]["counts"]
    assert counts["days"] == 15 and counts["input_rows"] == counts["kept_rows"] + counts["quarantined"] > 0
    assert second["ingest"]["fingerprint"] != first["ingest"]["fingerprint"]


@pytest.mark.slow
def test_existing_sets_stay_and_only_new_sets_are_embedded(runs):
    root, first, _, second, _ = runs
    old, new = shot_sets(first["fewshot"]["output_dir"]), shot_sets(second["fewshot"]["output_dir"])
    reward_users = set(
        pq.read_table(Path(second["relabel"]["output_dir"]) / REWARD_USERS_FILE)["user_id"].to_pylist()
    )
    people = {sid: s for sid, s in old.items() if s["user_id"] not in reward_users}
    assert people and all(new.get(sid) == s for sid, s in people.items())  # a person's sets never change
    assert len(new) > len(old)

    counts = second["embed"]["counts"]
    fresh = set(new) - set(old)
    assert counts["sets_computed"] == len(fresh) > 0
    assert counts["sets_reused"] == len(set(new) & set(old)) > 0
    assert counts["shot_sets"] == len(new)
    emb_old, emb_new = embeddings(first["embed"]["output_dir"]), embeddings(second["embed"]["output_dir"])
    assert all(emb_new[sid] == emb_old[sid] for sid in set(new) & set(old))


@pytest.mark.slow
def test_the_union_equals_a_plain_run_over_all_days(runs):
    _, _, _, second, plain = runs
    assert "partitions" not in plain["ingest"]
    part_sets, plain_sets = (shot_sets(r["fewshot"]["output_dir"]) for r in (second, plain))
    assert part_sets == plain_sets
    for name in ("train_pairs", "eval_pairs", "users"):
        tables = [read_fewshot(r["fewshot"]["output_dir"], name) for r in (second, plain)]
        assert tables[0].equals(tables[1]), name
    part_emb, plain_emb = (embeddings(r["embed"]["output_dir"]) for r in (second, plain))
    assert part_emb == plain_emb  # bitwise, reused or computed
    assert plain["embed"]["counts"]["sets_reused"] == 0


@pytest.mark.slow
def test_status_shows_the_days_and_a_lost_day_is_ingested_alone(runs):
    root, _, _, second, _ = runs
    status = json.loads(ppd("status", "--root", root, "--json").stdout)
    assert [(p["day"], p["state"]) for p in status["partitions"]] == [(d, "completed") for d in DAYS]
    assert {s["name"] for s in status["stages"]} >= {"ingest", "fewshot", "embed"}

    lost = _partition_manifests(root)[DAYS[12]].parent
    shutil.rmtree(lost)
    status = json.loads(ppd("status", "--root", root, "--json").stdout)
    states = {p["day"]: p["state"] for p in status["partitions"]}
    assert states[DAYS[12]] == "missing" and sum(s == "completed" for s in states.values()) == 14

    again = run_json("--root", root, *WORLD, "--stages", "embed", "--partitioned")
    assert again["ingest"]["partitions"]["computed"] == [DAYS[12]]
    # the day comes back byte for byte, so the union and everything downstream are cache hits
    assert all(s["cached"] for s in again.values())
    assert all(again[s]["output_dir"] == second[s]["output_dir"] for s in again)


def test_window_mistakes_are_one_line_errors(tmp_path):
    for args, needle in (
        (["--start", DAYS[0]], "add --partitioned"),
        (["--partitioned", "--start", DAYS[5], "--end", DAYS[1]], "is after --end"),
        (["--partitioned", "--end", "2023-5-1"], "--end '2023-5-1' is not a date"),
    ):
        proc = ppd("run", "--root", str(tmp_path), "--stages", "ingest", *args, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr

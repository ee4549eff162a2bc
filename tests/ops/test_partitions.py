"""Date partitions in ppd_core, without Prefect: day listing, one-day ingest, fingerprints, lock, state."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import time

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ppd_core.config import load_config
from ppd_core.data import partitions as parts
from ppd_core.data.ingest import ingest
from ppd_core.data.pickapic import resolve_source
from ppd_core.errors import InputError, StageError
from ppd_core.manifest import is_complete, load_manifest
from tests.data.pickapic_factory import good_row, to_table, write_parquet
from tests.ops.conftest import DAYS, ROWS_PER_DAY

FIRST, LAST = dt.date.fromisoformat(DAYS[0]), dt.date.fromisoformat(DAYS[-1])


def _cfg(root, source):
    return load_config(None, [f"run.root={root}", f"ingest.source={source}"], environ={})


def _pairs(directory) -> list[dict]:
    return ds.dataset(directory / "pairs", format="parquet", partitioning="hive").to_table().to_pylist()


def test_source_days_lists_each_day_with_the_files_holding_it(pickapic_source):
    files = resolve_source(str(pickapic_source))
    days = parts.source_days(files)
    assert list(days) == list(DAYS)
    assert all(len(held) == 2 for held in days.values())  # both files hold rows of every day


def test_one_day_ingest_keeps_that_day_with_its_source_rows(pickapic_source, tmp_path):
    cfg = _cfg(tmp_path, pickapic_source)
    files = resolve_source(str(pickapic_source))
    full = ingest(cfg.ingest, files, tmp_path / "full")
    union = set()
    for day in DAYS:
        counts = ingest(cfg.ingest, files, tmp_path / day, created_date=day)
        assert counts["input_rows"] == counts["kept_rows"] == ROWS_PER_DAY
        assert counts["partitions"] == {day: ROWS_PER_DAY}
        for pair in _pairs(tmp_path / day):
            source = pq.read_table(pair["source_file"]).slice(pair["source_row"], 1).to_pylist()[0]
            assert source["ranking_id"] == pair["ranking_id"]  # source_row points at the row itself
            assert source["created_at"].date().isoformat() == day
            union.add(pair["pair_id"])
    assert union == {p["pair_id"] for p in _pairs(tmp_path / "full")}
    assert full["kept_rows"] == len(union)


def test_a_new_file_with_a_new_day_leaves_earlier_days_unchanged(pickapic_source, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for f in pickapic_source.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    cfg = _cfg(tmp_path, source)
    before = {p.day: p.fingerprint for p in parts.plan_partitions(cfg, FIRST, LAST + dt.timedelta(days=5))}
    write_parquet(to_table([good_row(100, day=4)]), source / "train-00002.parquet")
    after = {p.day: p.fingerprint for p in parts.plan_partitions(cfg, FIRST, LAST + dt.timedelta(days=5))}
    assert {d: after[d] for d in before} == before
    assert set(after) - set(before) == {"2023-05-05"}


@pytest.mark.parametrize(("start", "end"), [("2023-05-3", "2023-05-04"), ("2023-05-04", "2023-05-01")])
def test_bad_ranges_are_input_errors(pickapic_source, tmp_path, start, end):
    with pytest.raises(InputError):
        parts.plan_partitions(_cfg(tmp_path, pickapic_source), parts.parse_day(start), parts.parse_day(end))


HOLD = """
import sys, time
from ppd_core.data.partitions import partition_lock
with partition_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def test_lock_held_by_another_process_times_out_then_frees(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), DAYS[0], "3"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    assert parts.is_locked(tmp_path, DAYS[0]) and not parts.is_locked(tmp_path, DAYS[1])
    with (
        pytest.raises(StageError, match="still locked"),
        parts.partition_lock(tmp_path, DAYS[0], timeout=0.3),
    ):
        pass
    t0 = time.monotonic()
    with parts.partition_lock(tmp_path, DAYS[0], timeout=30):  # waits for the holder to finish
        waited = time.monotonic() - t0
    holder.wait(timeout=30)
    assert waited > 1.0 and not parts.is_locked(tmp_path, DAYS[0])


def test_state_follows_outputs_and_processes(pickapic_source, tmp_path):
    cfg = _cfg(tmp_path, pickapic_source)
    plan = parts.plan_partitions(cfg, FIRST, FIRST)[0]
    assert parts.partition_state(tmp_path, plan.day, plan.fingerprint)["state"] == "missing"
    parts.write_status(tmp_path, plan, "running")  # this process: alive
    assert parts.partition_state(tmp_path, plan.day, plan.fingerprint)["state"] == "running"
    parts.write_status(tmp_path, plan, "running", pid=2**22 + 12345)  # a pid that is not running
    row = parts.partition_state(tmp_path, plan.day, plan.fingerprint)
    assert row["state"] == "failed" and "interrupted" in row["error"]

    done = parts.run_partition(cfg, plan)
    assert done["state"] == "completed" and done["rows"] == ROWS_PER_DAY and not done["reused"]
    assert load_manifest(plan.directory).partition == plan.partition and is_complete(plan.directory)
    assert parts.run_partition(cfg, plan)["reused"]
    assert parts.complete_partitions(tmp_path) == [plan.directory]

    (plan.directory / "quarantine" / "part-00000.parquet").unlink()  # a damaged output is not complete
    assert parts.partition_state(tmp_path, plan.day, plan.fingerprint)["state"] == "missing"
    assert parts.complete_partitions(tmp_path) == []


def test_partitioned_ingest_stage_is_the_union_of_the_days_and_a_failed_day_stops_it(
    pickapic_source, tmp_path
):
    """The plain-Python driver: days first (a failed one named, the others kept), then the union, which
    readers see as the same pairs and images as one full ingest of the source."""
    from ppd_core import pipeline
    from ppd_core.data.fewshot import read_pairs
    from ppd_core.data.images import ingest_images
    from ppd_core.data.union import UNION_FILE, is_union
    from tests.ops.test_backfill import _damage_column

    source, root = tmp_path / "source", tmp_path / "run"
    for f in pickapic_source.iterdir():
        (source / f.name).parent.mkdir(exist_ok=True)
        (source / f.name).write_bytes(f.read_bytes())
    late = source / "train-00001.parquet"  # sorted by day, one-day row groups: row group 0 is day 1
    st = late.stat()
    original = _damage_column(late, "caption")
    cfg = load_config(
        None, [f"run.root={root}", f"ingest.source={source}", "ingest.partitioned=true"], environ={}
    )
    with pytest.raises(parts.PartitionsFailed, match=DAYS[0]) as failed:
        pipeline.run_stages(cfg, ["ingest"])
    assert "not a readable Parquet file" in str(failed.value) and "a rerun retries" in str(failed.value)
    states = {r["day"]: r["state"] for r in parts.status_table(root)}
    assert states == {DAYS[0]: "failed", DAYS[1]: "completed", DAYS[2]: "completed"}
    assert not any(p.is_dir() and not p.name.startswith(".") for p in (root / "ingest").glob("*"))

    late.write_bytes(original)
    os.utime(late, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = pipeline.run_stages(cfg, ["ingest"])["ingest"]
    assert is_union(out.directory) and set(out.manifest.files) == {UNION_FILE}
    counts = out.manifest.counts
    assert (counts["days"], counts["kept_rows"], counts["rows_without_created_at"]) == (
        3,
        3 * ROWS_PER_DAY,
        0,
    )
    full = ingest(cfg.ingest, resolve_source(str(source)), tmp_path / "full")
    assert full["kept_rows"] == counts["kept_rows"]
    assert read_pairs(out.directory).equals(read_pairs(tmp_path / "full"))
    union, whole = ingest_images(out.directory), ingest_images(tmp_path / "full")
    assert sorted(union.uids) == sorted(whole.uids)
    assert all(union.get_bytes(u) == whole.get_bytes(u) for u in whole.uids)
    assert [r["state"] for r in parts.status_table(root)] == ["completed"] * 3

    # a day rewritten under the union is an error for its readers, never a silent gap
    day = sorted((root / "partitions" / "ingest").glob("created_date=*/*/manifest.json"))[1]
    shutil.rmtree(day.parent)
    with pytest.raises(StageError, match="gone or was rewritten"):
        read_pairs(out.directory)
    assert parts.status_table(root)[1]["state"] == "missing"


def test_status_table_lists_planned_days_without_output_as_missing(pickapic_source, tmp_path):
    cfg = _cfg(tmp_path, pickapic_source)
    plans = parts.plan_partitions(cfg, FIRST, LAST)
    assert parts.status_table(tmp_path) == []
    parts.record_plans(tmp_path, plans[:2])
    parts.run_partition(cfg, plans[0])
    rows = parts.status_table(tmp_path)
    assert [(r["day"], r["state"]) for r in rows] == [(DAYS[0], "completed"), (DAYS[1], "missing")]
    assert parts.read_planned(tmp_path) == {p.day: p.fingerprint for p in plans[:2]}

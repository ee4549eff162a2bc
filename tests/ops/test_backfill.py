"""`ppd backfill` against a real Prefect server: only missing or failed days run, --force, the lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ppd_core.data.partitions import read_status
from ppd_core.manifest import is_complete, load_manifest
from tests.data.pickapic_factory import to_table, write_parquet
from tests.ops.conftest import DAYS, PPD, REPO, ROWS_PER_DAY, pickapic_rows, task_runs_of


def _backfill(ppd_json, root, source, start=DAYS[0], end=DAYS[-1], *extra) -> dict:
    return ppd_json("backfill", "--root", root, "--source", source, "--start", start, "--end", end, *extra)


def _submitted(report: dict) -> list[str]:
    return [r["day"] for r in report["partitions"] if r["submitted"]]


def _partition_task_runs(api, report: dict) -> list[str]:
    return sorted(tr.name for tr in task_runs_of(api, report["flow_run_id"]) if "partition" in tr.tags)


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory, pickapic_source, server_env):
    """A root whose first backfill of the three days has run; yields (root, first report)."""
    root = tmp_path_factory.mktemp("backfill") / "run"
    args = ["backfill", "--root", root, "--source", pickapic_source, "--start", DAYS[0], "--end", DAYS[-1]]
    proc = subprocess.run(
        [PPD, *map(str, args), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=server_env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, json.loads(proc.stdout)


def test_backfill_creates_exactly_the_missing_partitions_once(backfilled, ppd_json, pickapic_source, api):
    root, first = backfilled
    assert first["ok"] and _submitted(first) == list(DAYS)
    assert _partition_task_runs(api, first) == [f"ingest_partition-{d}" for d in DAYS]
    for row in first["partitions"]:
        assert row["state"] == "completed" and row["rows"] == ROWS_PER_DAY and row["quarantined"] == 0
        assert row["key"] == f"ingest-{row['day']}-{row['fingerprint']}"
        assert is_complete(row["directory"]) and load_manifest(row["directory"]).partition == row["partition"]

    again = _backfill(ppd_json, root, pickapic_source)
    assert _submitted(again) == [] and _partition_task_runs(api, again) == []
    assert [r["directory"] for r in again["partitions"]] == [r["directory"] for r in first["partitions"]]

    shutil.rmtree(first["partitions"][1]["directory"])  # one day lost: only it runs again
    third = _backfill(ppd_json, root, pickapic_source)
    assert _submitted(third) == [DAYS[1]] and _partition_task_runs(api, third) == [
        f"ingest_partition-{DAYS[1]}"
    ]
    assert all(r["state"] == "completed" for r in third["partitions"])


def test_backfill_force_recomputes_complete_days(backfilled, ppd_json, pickapic_source):
    root, first = backfilled
    manifest = Path(first["partitions"][0]["directory"]) / "manifest.json"
    inode = manifest.stat().st_ino
    forced = _backfill(ppd_json, root, pickapic_source, DAYS[0], DAYS[0], "--force")
    assert _submitted(forced) == [DAYS[0]]
    assert read_status(root, DAYS[0])["reused"] is False and manifest.stat().st_ino != inode
    assert forced["partitions"][0]["directory"] == first["partitions"][0]["directory"]  # same fingerprint
    assert is_complete(forced["partitions"][0]["directory"])


def test_status_lists_the_partitions(backfilled, ppd_json):
    root, _ = backfilled
    status = ppd_json("status", "--root", root)
    assert [(p["day"], p["state"], p["rows"]) for p in status["partitions"]] == [
        (d, "completed", ROWS_PER_DAY) for d in DAYS
    ]
    assert any(r["flow"] == "ppd-backfill" for r in status["flow_runs"])


@pytest.mark.parametrize(
    ("start", "end", "source", "needle"),
    [
        ("2023-5-01", DAYS[0], None, "not a date in the form YYYY-MM-DD"),
        ("2023-05-31", "2023-05-01", None, "is after --end"),
        (DAYS[0], DAYS[1], "/nonexistent/pickapic", "/nonexistent/pickapic"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(ppd, pickapic_source, tmp_path, start, end, source, needle):
    proc = ppd(
        "backfill",
        "--root",
        tmp_path,
        "--source",
        source or pickapic_source,
        "--start",
        start,
        "--end",
        end,
        check=False,
    )
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # one message (rich may wrap it once)


HOLDER = """
import json, sys, time
from pathlib import Path
from ppd_core.config import load_config
from ppd_core.data.partitions import parse_day, plan_partitions, run_partition
root, source, day, held, release = sys.argv[1:]
cfg = load_config(None, [f"run.root={root}", f"ingest.source={json.dumps(source)}"], environ={})
(plan,) = plan_partitions(cfg, parse_day(day), parse_day(day))

def hold(done, total):  # called while the day is being written, lock held
    Path(held).touch()
    while not Path(release).exists():
        time.sleep(0.05)

print(json.dumps(run_partition(cfg, plan, progress=hold)))
"""


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_backfill_waits_for_a_day_another_process_is_writing(pickapic_source, server_env, tmp_path):
    """A scheduled run (here: another process) writes day 2 and holds its lock; a backfill of that day
    waits for the lock, then finds the output complete and reuses it: one writer, no corruption."""
    root, day = tmp_path / "run", DAYS[1]
    held, release, log = tmp_path / "held", tmp_path / "release", tmp_path / "backfill.log"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), str(pickapic_source), day, str(held), str(release)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        _wait_for(held.exists, 60, "the other writer to hold the lock")
        args = [
            "backfill",
            "--root",
            root,
            "--source",
            pickapic_source,
            "--start",
            day,
            "--end",
            day,
            "--json",
        ]
        with open(log, "w") as err:
            backfill = subprocess.Popen(
                [PPD, *map(str, args)],
                cwd=REPO,
                env=server_env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
            _wait_for(lambda: "is locked" in log.read_text(), 120, "the backfill to wait on the lock")
            assert backfill.poll() is None
            release.touch()
            out, _ = backfill.communicate(timeout=120)
        written = json.loads(holder.communicate(timeout=60)[0])
    finally:
        release.touch()
        holder.kill()
    assert backfill.returncode == 0, log.read_text()[-3000:]
    row = json.loads(out)["partitions"][0]
    assert row["submitted"] and row["state"] == "completed" and row["rows"] == ROWS_PER_DAY
    assert read_status(root, day)["reused"] is True  # the backfill wrote nothing itself
    assert load_manifest(row["directory"]).digest == written["digest"] and is_complete(row["directory"])
    assert [p.name for p in Path(row["directory"]).parent.iterdir() if p.is_dir()] == [row["fingerprint"]]


def _damage_column(path: Path, column: str) -> bytes:
    """Overwrite the first page header of ``column`` in row group 0 (footer intact, size and mtime
    kept, so the file's identity and every fingerprint stay the same); returns the original bytes."""
    original, st = path.read_bytes(), path.stat()
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    damaged = bytearray(original)
    damaged[start : start + 24] = b"\xff" * 24
    path.write_bytes(bytes(damaged))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return original


def test_a_failed_day_is_reported_and_rerun_alone(ppd, ppd_json, tmp_path):
    source, root = tmp_path / "source", tmp_path / "run"
    rows = pickapic_rows()
    write_parquet(to_table([r for r in rows if r["created_at"].day < 3]), source / "a.parquet")
    late = source / "b.parquet"
    write_parquet(to_table([r for r in rows if r["created_at"].day == 3]), late)
    st = late.stat()
    original = _damage_column(late, "caption")  # day 3 cannot be read past its created_at column

    args = ["backfill", "--root", root, "--source", source, "--start", DAYS[0], "--end", DAYS[-1], "--json"]
    failed = ppd(*args, check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stdout
    report = json.loads(failed.stdout)
    assert not report["ok"] and [r["state"] for r in report["partitions"]] == [
        "completed",
        "completed",
        "failed",
    ]
    assert "not a readable Parquet file" in report["partitions"][2]["error"]
    assert read_status(root, DAYS[2])["state"] == "failed"

    late.write_bytes(original)  # the same file again: same identity, same idempotency key
    os.utime(late, ns=(st.st_atime_ns, st.st_mtime_ns))
    retried = ppd_json(*args[:-1])
    assert _submitted(retried) == [DAYS[2]] and retried["ok"]
    assert retried["partitions"][2]["key"] == report["partitions"][2]["key"]
    assert [r["state"] for r in retried["partitions"]] == ["completed"] * 3


def test_backfill_then_stages_runs_them_over_the_union_of_the_range(ppd_json, pickapic_source, tmp_path):
    root = tmp_path / "run"
    report = _backfill(ppd_json, root, pickapic_source, DAYS[0], DAYS[1], "--stages", "ingest")
    assert report["ok"] and _submitted(report) == list(DAYS[:2])
    (ingest,) = report["stages"]
    assert ingest["name"] == "ingest" and ingest["partitions"]["computed"] == []  # the backfill did them
    assert ingest["counts"]["days"] == 2 and ingest["counts"]["kept_rows"] == 2 * ROWS_PER_DAY
    assert yaml.safe_load((root / "run_config.yaml").read_text())["ingest"]["end"] == DAYS[1]
    # a partitioned run over the whole source adds the third day only and a new union
    more = ppd_json("run", "--root", root, "--source", pickapic_source, "--stages", "ingest", "--partitioned")
    assert more["stages"][0]["partitions"]["computed"] == [DAYS[2]]
    assert more["stages"][0]["output_dir"] != ingest["output_dir"]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("backfill", ["--config", "--root", "--source", "--start", "--end", "--force", "--stages", "--json"]),
        ("status", ["--root", "--json"]),
        ("ui", ["--root", "--port"]),
        ("serve", ["--root", "--config"]),
    ],
)
def test_help_lists_the_contract_options(ppd, command, options):
    text = ppd(command, "--help").stdout
    assert all(option in text for option in options)

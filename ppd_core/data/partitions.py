"""Date partitions of ingestion: which days a source holds, one day's ingest under a lock, its status.

A backfill (and a partitioned run, ``ingest.partitioned``) ingests a Pick-a-Pic source one creation day (``created_date=YYYY-MM-DD``, UTC for
zoned timestamps) at a time. Each day is an ordinary committed stage directory
(:func:`ppd_core.manifest.run_stage` with ``partition=``), beside a lock and a status file::

    <root>/partitions/ingest/created_date=2023-05-01/<fingerprint>/   manifest.json last, as every stage
    <root>/partitions/ingest/created_date=2023-05-01/status.json      state, rows, quarantined, seconds, error
    <root>/partitions/ingest/created_date=2023-05-01/.lock            held while the day is written

A day's fingerprint covers the ingest settings that change results, the identity (url, size,
version token) of the files that hold rows of that day, the day and the ingest code version. A new
file that only adds new days therefore leaves every earlier partition complete, and a replaced file
re-ingests only the days it holds. ``ingest-<day>-<fingerprint>`` is the partition's idempotency
key (the Prefect cache key of its task).

Status states: ``pending`` (planned, not started), ``running``, ``completed``, ``failed``; a day
with no output for the current fingerprint and no status is ``missing``. A ``pending`` or
``running`` status whose process is gone is reported as ``failed`` (interrupted). Status files are
written atomically and, but for ``pending``, only while holding the lock, so a backfill and a
scheduled run that reach the same day serialise: the second waits, then finds the output complete.

``<root>/partitions/ingest/planned.json`` keeps each day's fingerprint at its latest planning, so
``ppd status`` (:func:`status_table`) can show a planned day without output as ``missing`` without
listing the source.

A partitioned run plans its window (:func:`plan_window`), runs the days that are not complete
(:func:`ingest_window` here, one Prefect task per day in the flows), and its ``ingest`` stage is the
union of the window's complete days (:func:`union_entries`, :func:`write_partition_union`; the
format and its readers are :mod:`ppd_core.data.union`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ppd_core import locks
from ppd_core.config import PPDConfig, fingerprint, stable_fields
from ppd_core.data.ingest import VERSION as INGEST_VERSION
from ppd_core.data.ingest import created_at_stats
from ppd_core.data.pickapic import SourceFile, check_schema, open_parquet, resolve_source, source_identity
from ppd_core.errors import InputError, StageError
from ppd_core.layout import RunLayout
from ppd_core.manifest import atomic_write_json, is_complete, load_manifest, run_stage
from ppd_core.schemas import PAIRS_PARTITION, PICKAPIC_V2

STAGE = "ingest"
WINDOW_KEYS = (
    "partitioned",
    "start",
    "end",
)  # ingest keys that choose the mode and the days, not a day's output
PLANNED_FILE = "planned.json"
STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
STATES = ("missing", "pending", "running", "completed", "failed")
Progress = Callable[[int, int], None]


class PartitionsFailed(StageError):
    """Some partitions of a backfill failed (each one's error is in its status)."""

    def __init__(self, message: str, rows: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.rows = rows or []


def partition_name(day: str) -> str:
    """``created_date=YYYY-MM-DD``: the hive key of the day, as in the pairs table."""
    return f"{PAIRS_PARTITION}={day}"


def parse_day(text: str, what: str = "date") -> dt.date:
    """A YYYY-MM-DD date, or an InputError naming ``what``."""
    try:
        if len(text) != 10:
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{what} {text!r} is not a date in the form YYYY-MM-DD") from None


# ------------------------------------------------------------------------------------------ source


def _row_group_days(pf, group: int) -> set[dt.date]:
    """Days present in one row group: from its statistics when it spans one day, else a created_at scan."""
    span = created_at_stats(pf, group)
    if span is not None and span[0] == span[1]:
        return {span[0]}
    column = pf.read_row_group(group, columns=["created_at"]).column(0)
    days = pc.unique(pc.cast(pc.cast(column, PICKAPIC_V2.field("created_at").type), pa.date32()))
    return {d for d in days.to_pylist() if d is not None}


def source_days(files: Iterable[SourceFile], images: str = "auto") -> dict[str, list[SourceFile]]:
    """Each day with at least one row (``created_at`` not null) -> the files holding rows of it, sorted.

    Reads Parquet footers; only row groups whose statistics span several days (or have none) have
    their ``created_at`` column read. Schemas are checked as ingestion checks them.
    """
    days: dict[str, list[SourceFile]] = {}
    for f in files:
        pf = open_parquet(f)
        try:
            check_schema(pf.schema_arrow, f.url, images)
            found: set[dt.date] = set()
            for group in range(pf.metadata.num_row_groups):
                found |= _row_group_days(pf, group)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{f.url}: cannot read created_at ({e})") from e
        finally:
            pf.close()
        for day in found:
            days.setdefault(day.isoformat(), []).append(f)
    return dict(sorted(days.items()))


# -------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PartitionPlan:
    """One day of a source, decided before it runs."""

    day: str  # YYYY-MM-DD
    fingerprint: str
    files: tuple[str, ...]  # urls of the source files holding rows of the day
    directory: Path
    source: str | None = None  # the source listed (None: cfg.ingest.source)

    @classmethod
    def make(
        cls, root: str | Path, day: str, fingerprint: str, files: Iterable[str], source: str | None = None
    ) -> PartitionPlan:
        """Rebuild a plan from its JSON-able parts (what a Prefect task receives)."""
        directory = RunLayout(root).stage_dir(STAGE, fingerprint, partition_name(day))
        return cls(day, fingerprint, tuple(files), directory, source)

    @property
    def partition(self) -> str:
        return partition_name(self.day)

    @property
    def key(self) -> str:
        """Idempotency key: the Prefect cache key of the partition task."""
        return f"{STAGE}-{self.day}-{self.fingerprint}"


def day_settings(cfg: PPDConfig) -> dict:
    """The ingest settings that change how one day is ingested: all but the source (its files join the
    fingerprint instead) and the keys that choose the mode and the days (:data:`WINDOW_KEYS`)."""
    return {k: v for k, v in stable_fields(cfg.ingest).items() if k != "source" and k not in WINDOW_KEYS}


def partition_fingerprint(cfg: PPDConfig, day: str, files: Iterable[SourceFile]) -> str:
    extra = {"source": source_identity(files), "partition": partition_name(day)}
    return fingerprint(STAGE, day_settings(cfg), {}, INGEST_VERSION, extra)


def source_of(cfg: PPDConfig, dirs: Mapping[str, Path] | None = None) -> str:
    """What a partitioned ingest lists: ``ingest.source``, else the run's synthetic world (its
    ``synthesize`` output among ``dirs``)."""
    if cfg.ingest.source:
        return cfg.ingest.source
    from ppd_core.data.synthetic import DATA_DIR

    if not dirs or "synthesize" not in dirs:
        raise StageError("a partitioned ingest of the synthetic world needs the synthesize stage's output")
    return str(Path(dirs["synthesize"]) / DATA_DIR)


def window(cfg: PPDConfig) -> tuple[dt.date | None, dt.date | None]:
    """The configured days of a partitioned ingest (None: open on that side)."""
    start, end = cfg.ingest.start, cfg.ingest.end
    return (
        parse_day(start, "ingest.start") if start else None,
        parse_day(end, "ingest.end") if end else None,
    )


def plan_partitions(
    cfg: PPDConfig, start: dt.date | None, end: dt.date | None, source: str | None = None
) -> list[PartitionPlan]:
    """The days of ``source`` (default ``cfg.ingest.source``) between ``start`` and ``end`` (inclusive;
    None: open) that hold rows."""
    source = source or cfg.ingest.source
    if not source:
        raise InputError("a backfill needs a source (--source PATH_OR_URL)")
    if start is not None and end is not None and start > end:
        raise InputError(f"start {start} is after end {end}")
    layout = RunLayout(cfg.run.root)
    plans = []
    for day, files in source_days(resolve_source(source), cfg.ingest.images).items():
        when = dt.date.fromisoformat(day)
        if (start is None or start <= when) and (end is None or when <= end):
            fp = partition_fingerprint(cfg, day, files)
            directory = layout.stage_dir(STAGE, fp, partition_name(day))
            plans.append(PartitionPlan(day, fp, tuple(f.url for f in files), directory, source))
    return plans


def to_run(root: str | Path, plans: Iterable[PartitionPlan], force: bool = False) -> list[PartitionPlan]:
    """The planned days a run submits: those not complete (missing or failed), every day with ``force``."""
    plans = list(plans)
    rows = partition_table(root, plans)
    return [p for p, row in zip(plans, rows, strict=True) if force or row["state"] != "completed"]


def record_plans(root: str | Path, plans: Iterable[PartitionPlan]) -> None:
    """Remember each planned day's current fingerprint in ``<root>/partitions/ingest/planned.json``, so
    that ``ppd status`` shows planned days that have no output yet as missing without listing the source.
    Merged day by day under a lock (a backfill and a scheduled run may plan at once)."""
    plans = list(plans)
    if not plans:
        return
    path = RunLayout(root).partitions_root(STAGE) / PLANNED_FILE
    with locks.hold(path.with_name(f".{PLANNED_FILE}.lock"), what="the partition plan record"):
        days = read_planned(root)
        days.update({p.day: p.fingerprint for p in plans})
        atomic_write_json(path, {"days": dict(sorted(days.items())), "updated_at": _now()})


def read_planned(root: str | Path) -> dict[str, str]:
    """Day -> fingerprint at its latest planning (empty when nothing was planned)."""
    try:
        data = json.loads((RunLayout(root).partitions_root(STAGE) / PLANNED_FILE).read_text())
        return {str(k): str(v) for k, v in data["days"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return {}


# ------------------------------------------------------------------------------------ lock, status


def lock_path(root: str | Path, day: str) -> Path:
    return RunLayout(root).partition_dir(STAGE, partition_name(day)) / LOCK_FILE


@contextmanager
def partition_lock(root: str | Path, day: str, timeout: float | None = None, on_wait=None):
    """Hold the day's file lock (across processes); ``timeout`` None waits for ever.

    ``on_wait(message)`` is called once when the lock is busy, before waiting."""

    def waiting(_: str) -> None:
        holder = read_status(root, day) or {}
        on_wait(f"{partition_name(day)} is locked (pid {holder.get('pid', '?')}); waiting")

    with locks.hold(lock_path(root, day), timeout, waiting if on_wait else None, partition_name(day)):
        yield


def is_locked(root: str | Path, day: str) -> bool:
    return locks.is_held(lock_path(root, day))


def read_status(root: str | Path, day: str) -> dict[str, Any] | None:
    path = RunLayout(root).partition_dir(STAGE, partition_name(day)) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_status(root: str | Path, plan: PartitionPlan, state: str, **fields) -> dict[str, Any]:
    if state not in STATES:
        raise ValueError(f"unknown partition state {state!r}")
    status = {
        "partition": plan.partition,
        "day": plan.day,
        "state": state,
        "fingerprint": plan.fingerprint,
        "key": plan.key,
        "directory": str(plan.directory),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated_at": _now(),
        **fields,
    }
    atomic_write_json(RunLayout(root).partition_dir(STAGE, plan.partition) / STATUS_FILE, status)
    return status


def mark_pending(root: str | Path, plan: PartitionPlan) -> None:
    """Record that a run was planned, unless another process holds the day (its status stays)."""
    if not is_locked(root, plan.day):
        write_status(root, plan, "pending")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _alive(status: dict[str, Any]) -> bool:
    """Whether the process that wrote ``status`` still runs (assumed so on another host)."""
    if status.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(status["pid"]), 0)
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------------------------- run


def _files_for(cfg: PPDConfig, plan: PartitionPlan) -> list[SourceFile]:
    listing = {f.url: f for f in resolve_source(plan.source or cfg.ingest.source)}
    gone = [u for u in plan.files if u not in listing]
    if gone:
        raise StageError(f"{plan.partition}: source file(s) gone since planning: {', '.join(gone)}")
    files = [listing[u] for u in plan.files]
    if partition_fingerprint(cfg, plan.day, files) != plan.fingerprint:
        raise StageError(f"{plan.partition}: the source changed since planning; plan the backfill again")
    return files


def run_partition(
    cfg: PPDConfig,
    plan: PartitionPlan,
    *,
    force: bool = False,
    lock_timeout: float | None = None,
    progress: Progress | None = None,
    on_wait=None,
) -> dict[str, Any]:
    """Ingest one day under its lock (reusing a complete output unless ``force``); returns its status."""
    root = cfg.run.root
    with partition_lock(root, plan.day, lock_timeout, on_wait):
        started, t0 = _now(), time.perf_counter()
        write_status(root, plan, "running", started_at=started)
        try:
            files = _files_for(cfg, plan)
            outcome = run_stage(
                RunLayout(root),
                STAGE,
                plan.fingerprint,
                lambda out: _ingest_day(cfg, files, out, plan.day, progress),
                code_version=INGEST_VERSION,
                config=cfg.model_dump(mode="json"),
                upstream={},
                partition=plan.partition,
                force=force,
            )
        except BaseException as e:
            write_status(
                root,
                plan,
                "failed",
                started_at=started,
                seconds=round(time.perf_counter() - t0, 3),
                error=f"{type(e).__name__}: {e}",
            )
            raise
        counts = outcome.manifest.counts
        return write_status(
            root,
            plan,
            "completed",
            started_at=started,
            finished_at=_now(),
            seconds=round(time.perf_counter() - t0, 3),
            reused=outcome.reused,
            rows=counts.get("kept_rows", 0),
            quarantined=counts.get("quarantined", 0),
            input_rows=counts.get("input_rows", 0),
            digest=outcome.manifest.digest,
        )


def plan_window(cfg: PPDConfig, dirs: Mapping[str, Path] | None = None) -> list[PartitionPlan]:
    """The days of a partitioned run (``ingest.start``..``ingest.end`` of its source), recorded for status."""
    plans = plan_partitions(cfg, *window(cfg), source=source_of(cfg, dirs))
    record_plans(cfg.run.root, plans)
    return plans


def run_summary(plans: Iterable[PartitionPlan], submitted: Mapping[str, dict | None]) -> dict[str, Any]:
    """What a partitioned run did to its days: ``submitted`` maps each submitted day to its final status
    (None when it failed)."""
    computed = [d for d, st in submitted.items() if st is not None and not st.get("reused")]
    return {
        "days": len(list(plans)),
        "submitted": sorted(submitted),
        "computed": sorted(computed),
        "failed": sorted(d for d, st in submitted.items() if st is None),
    }


def ingest_window(
    cfg: PPDConfig, dirs: Mapping[str, Path] | None = None, force: bool = False
) -> dict[str, Any]:
    """Plain-Python driver of a partitioned ingest: run every day of the window that is missing or failed
    (every day with ``force``), one after another, each under its lock; raise :class:`PartitionsFailed`
    naming the days that failed once all were tried. Returns :func:`run_summary`."""
    plans = plan_window(cfg, dirs)
    todo = to_run(cfg.run.root, plans, force)
    for plan in todo:
        mark_pending(cfg.run.root, plan)
    done: dict[str, dict | None] = {}
    for plan in todo:
        try:
            done[plan.day] = run_partition(cfg, plan, force=force)
        except Exception:  # recorded in the day's status; the other days still run
            done[plan.day] = None
    summary = run_summary(plans, done)
    if summary["failed"]:
        raise failed_days(cfg.run.root, plans, summary["failed"])
    return summary


def failed_days(root: str | Path, plans: Iterable[PartitionPlan], failed: Iterable[str]) -> PartitionsFailed:
    """The error of a partitioned run some of whose days failed: each day with its error, and what to do."""
    rows = partition_table(root, plans)
    errors = {r["day"]: r.get("error") for r in rows}
    failed = sorted(failed)
    detail = "; ".join(f"{d} ({errors.get(d) or 'failed'})" for d in failed)
    return PartitionsFailed(
        f"{len(failed)} partition(s) failed: {detail}; the other days are kept, a rerun retries these", rows
    )


def _ingest_day(cfg: PPDConfig, files, out: Path, day: str, progress) -> dict:
    from ppd_core.data.ingest import ingest

    return ingest(cfg.ingest, files, out, progress=progress, created_date=day)


# ------------------------------------------------------------------------------------------ report


def partition_state(root: str | Path, day: str, fingerprint: str | None = None) -> dict[str, Any]:
    """The day's row of the partition table, derived from disk.

    ``fingerprint`` is the current one (from a plan); without it the status file's, else the newest
    complete output's, is taken."""
    partition = partition_name(day)
    layout = RunLayout(root)
    status = read_status(root, day) or {}
    fp = fingerprint or status.get("fingerprint") or _newest_complete_fingerprint(layout, partition)
    same = bool(fp) and status.get("fingerprint") == fp
    row: dict[str, Any] = {"partition": partition, "day": day, "fingerprint": fp, "state": "missing"}
    row.update({k: status.get(k) for k in ("rows", "quarantined", "seconds", "error")} if same else {})
    row["key"] = f"{STAGE}-{day}-{fp}" if fp else None
    row["directory"] = str(layout.stage_dir(STAGE, fp, partition)) if fp else None
    busy = same and status.get("state") in ("pending", "running")
    if busy and _alive(status):
        row["state"] = status["state"]
    elif fp and is_complete(layout.stage_dir(STAGE, fp, partition)):
        counts = load_manifest(layout.stage_dir(STAGE, fp, partition)).counts
        row.update(state="completed", error=None, rows=counts.get("kept_rows"))
        row["quarantined"] = counts.get("quarantined")
    elif busy:
        row.update(state="failed", error=f"interrupted: process {status.get('pid')} is gone")
    elif same and status.get("state") == "failed":
        row["state"] = "failed"
    if row["state"] != "completed":
        row["directory"] = None
    return row


def _newest_complete_fingerprint(layout: RunLayout, partition: str) -> str | None:
    base = layout.partition_dir(STAGE, partition)
    if not base.is_dir():
        return None
    dirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)]
    return max(dirs, key=lambda p: p.stat().st_mtime).name if dirs else None


def known_days(root: str | Path) -> list[str]:
    """Days that have a partition directory under the run root."""
    base = RunLayout(root).partitions_root(STAGE)
    prefix = f"{PAIRS_PARTITION}="
    if not base.is_dir():
        return []
    return sorted(p.name.removeprefix(prefix) for p in base.iterdir() if p.name.startswith(prefix))


def partition_table(
    root: str | Path, plans: Iterable[PartitionPlan] | None = None, days: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """One row per day: the planned days (with their current fingerprints) or ``days`` or every known one."""
    if plans is not None:
        return [partition_state(root, p.day, p.fingerprint) for p in plans]
    return [partition_state(root, d) for d in (known_days(root) if days is None else days)]


def complete_partitions(root: str | Path) -> list[Path]:
    """The complete output directory of every known day (its newest complete one), in day order."""
    rows = partition_table(root)
    return [Path(r["directory"]) for r in rows if r["state"] == "completed"]


# ------------------------------------------------------------------------------------------- union


def union_entries(root: str | Path, plans: Iterable[PartitionPlan]) -> list[dict[str, Any]]:
    """The planned days as entries of a union (:mod:`ppd_core.data.union`); every one must be complete.

    A day that is not (it failed, or its output was removed since) is a :class:`PartitionsFailed`
    naming it: downstream stages never run on fewer days than were asked for."""
    root = Path(root).resolve()
    plans = list(plans)
    rows = partition_table(root, plans)
    bad = [
        f"{r['day']} ({r['state']}{': ' + r['error'] if r.get('error') else ''})"
        for r in rows
        if r["state"] != "completed"
    ]
    if bad:
        raise PartitionsFailed(
            f"{len(bad)} day(s) not ingested: {'; '.join(bad)}; rerun to retry them (ppd run --partitioned)",
            rows,
        )
    return [
        {
            "day": p.day,
            "partition": p.partition,
            "fingerprint": p.fingerprint,
            "digest": load_manifest(p.directory).digest,
            "directory": str(p.directory.relative_to(root)),
        }
        for p in plans
    ]


def write_partition_union(root: str | Path, entries: list[dict[str, Any]], out: Path, source: str) -> dict:
    """The `ingest` stage body of a partitioned run: ``partitions.json`` and the days' counts summed."""
    from ppd_core.data.union import sum_counts, write_union

    if not entries:
        raise StageError(f"{source}: no creation day with rows in the chosen window; nothing to ingest")
    write_union(out, entries)
    layout = RunLayout(root)
    counts = [load_manifest(layout.root / e["directory"]).counts for e in entries]
    total = sum_counts([{k: v for k, v in c.items() if k != "per_file"} for c in counts])
    total.update(
        days=len(entries),
        first_day=entries[0]["day"],
        last_day=entries[-1]["day"],
        has_images=any(c.get("has_images") for c in counts),
        rows_without_created_at=undated_rows(resolve_source(source)),
    )
    return total


def undated_rows(files: Iterable[SourceFile]) -> int:
    """Source rows with a null ``created_at``: they belong to no day, so a partitioned ingest leaves them
    out (a full ingest quarantines them as missing_created_at). From row-group statistics where present."""
    total = 0
    for f in files:
        pf = open_parquet(f)
        try:
            column = pf.schema_arrow.get_field_index("created_at")
            for group in range(pf.metadata.num_row_groups):
                stats = pf.metadata.row_group(group).column(column).statistics
                if stats is not None and stats.has_null_count:
                    total += stats.null_count
                else:
                    total += pf.read_row_group(group, columns=["created_at"]).column(0).null_count
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{f.url}: cannot read created_at ({e})") from e
        finally:
            pf.close()
    return total


def status_table(root: str | Path) -> list[dict[str, Any]]:
    """``ppd status``'s partition table, from disk only (no source listing): every day planned so far
    (with the fingerprint of its latest planning: ``missing`` when that output is not there) and every
    other day that has a partition directory."""
    planned = read_planned(root)
    days = sorted(set(planned) | set(known_days(root)))
    return [partition_state(root, day, planned.get(day)) for day in days]

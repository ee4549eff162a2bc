"""The union of complete ingest partitions, as the `ingest` stage's output of a partitioned run.

A partitioned run (``ingest.partitioned``, :mod:`ppd_core.data.partitions`) ingests each creation day
into its own committed directory under ``<root>/partitions/ingest/``. The `ingest` stage then
writes no data of its own: its output directory holds ``partitions.json``, one entry per complete
day (day, partition fingerprint, the digest of that day's manifest, its directory relative to the
run root), beside the usual ``manifest.json``::

    <root>/ingest/<fingerprint>/partitions.json
    <root>/ingest/<fingerprint>/manifest.json      counts: the days' counts summed, plus days/first/last

The stage's fingerprint covers those digests, so it (and everything downstream) changes exactly when
the set of days or the content of one of them changes, and a rerun with the same days is a cache hit.
Readers never spell the layout: :func:`pairs_roots` and :func:`image_roots` give the directories
that hold the pairs tables and image stores of an ingest output, whichever kind it is
(:func:`ppd_core.data.fewshot.read_pairs` and :func:`ppd_core.data.images.ingest_images` use them).
A referenced day whose manifest no longer matches its recorded digest is an error, never a silent gap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ppd_core.errors import StageError
from ppd_core.manifest import atomic_write_json, load_manifest

UNION_FILE = "partitions.json"
PAIRS_DIR = "pairs"
IMAGES_DIR = "images"
ENTRY_KEYS = ("day", "partition", "fingerprint", "digest", "directory")


def is_union(ingest_dir: str | Path) -> bool:
    """Whether an ingest output is a union of partitions (rather than data of its own)."""
    return (Path(ingest_dir) / UNION_FILE).is_file()


def run_root_of(ingest_dir: str | Path) -> Path:
    """The run root of ``<root>/ingest/<fingerprint>`` (or of its ``.partial`` directory)."""
    return Path(ingest_dir).resolve().parent.parent


def write_union(out_dir: str | Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """Write ``partitions.json`` (entries in day order, each with :data:`ENTRY_KEYS`)."""
    rows = [{k: e[k] for k in ENTRY_KEYS} for e in sorted(entries, key=lambda e: e["day"])]
    atomic_write_json(Path(out_dir) / UNION_FILE, {"partitions": rows})


def read_union(ingest_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of a union output, in day order."""
    path = Path(ingest_dir) / UNION_FILE
    try:
        return list(json.loads(path.read_text())["partitions"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StageError(f"{path}: unreadable partition list ({e})") from e


def partition_dirs(ingest_dir: str | Path) -> list[Path]:
    """The day directories a union output references, each checked against its recorded digest."""
    root = run_root_of(ingest_dir)
    dirs = []
    for entry in read_union(ingest_dir):
        directory = root / entry["directory"]
        manifest = load_manifest(directory)
        if manifest is None or manifest.digest != entry["digest"]:
            raise StageError(
                f"{ingest_dir} references {entry['partition']} at {directory}, which is gone or was rewritten; "
                "run `ppd run --partitioned` again to ingest it and rebuild the union"
            )
        dirs.append(directory)
    return dirs


def pairs_roots(ingest_dir: str | Path) -> list[Path]:
    """The hive-partitioned ``pairs/`` directories of an ingest output (one per day for a union)."""
    if is_union(ingest_dir):
        return [d / PAIRS_DIR for d in partition_dirs(ingest_dir)]
    return [Path(ingest_dir) / PAIRS_DIR]


def image_roots(ingest_dir: str | Path) -> list[Path]:
    """The image store directories of an ingest output, in day order for a union (days without images
    are left out)."""
    if is_union(ingest_dir):
        return [d / IMAGES_DIR for d in partition_dirs(ingest_dir)]
    return [Path(ingest_dir) / IMAGES_DIR]


def sum_counts(counts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Numeric counts summed key by key (nested dicts of numbers too); other values are left out."""
    total: dict[str, Any] = {}
    for c in counts:
        for key, value in c.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, Mapping) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
            ):
                inner = total.setdefault(key, {})
                if isinstance(inner, dict):
                    for k, v in value.items():
                        inner[k] = inner.get(k, 0) + v
    return total

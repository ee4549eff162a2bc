"""Builds small Pick-a-Pic v2 tables and files with chosen quirks, for ingestion tests.

``good_row(i)`` is a valid labelled comparison (real JPEG bytes drawn with PIL; the winner side
alternates with ``i``); ``quirk_file_rows()`` returns rows seeding every quirk ingestion knows
with the reason each row must get; ``to_table`` / ``write_parquet`` turn rows into the exact v2
schema (or the metadata-only twin, or variant types).
"""

from __future__ import annotations

import datetime as dt
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ppd_core.schemas import IMAGE_COLUMNS, PICKAPIC_V2, PICKAPIC_V2_METADATA

START = dt.datetime(2023, 5, 1, 8, 0)


def image_bytes(seed: int, size: int = 16, fmt: str = "JPEG") -> bytes:
    """A distinct real image (seeded noise), encoded by PIL."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny but well-formed PNG whose header claims ``width x height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` fraction of ``data``: a cut-off download."""
    return data[: int(len(data) * keep)]


def uid(i: int, side: int) -> str:
    return f"{i:08x}-0000-4000-8000-{side:012x}"


def good_row(
    i: int, *, user_id: int | None = None, day: int | None = None, winner: int | None = None
) -> dict:
    """A valid labelled row. ``winner`` (0 or 1) defaults to ``i % 2``; ``day`` offsets created_at in days."""
    winner = i % 2 if winner is None else winner
    u0, u1 = uid(i, 0), uid(i, 1)
    return {
        "are_different": True,
        "best_image_uid": (u0, u1)[winner],
        "caption": f"a watercolor of object {i}",
        "created_at": START + dt.timedelta(days=day if day is not None else i % 3, minutes=i),
        "has_label": True,
        "image_0_uid": u0,
        "image_0_url": f"https://example.invalid/{u0}.png",
        "image_1_uid": u1,
        "image_1_url": f"https://example.invalid/{u1}.png",
        "jpg_0": image_bytes(2 * i),
        "jpg_1": image_bytes(2 * i + 1),
        "label_0": 1.0 if winner == 0 else 0.0,
        "label_1": 0.0 if winner == 0 else 1.0,
        "model_0": "sd-a",
        "model_1": "sd-b",
        "ranking_id": 10_000 + i,
        "user_id": 100 + i % 5 if user_id is None else user_id,
        "num_example_per_prompt": 1,
        "__index_level_0__": i,
    }


def to_table(
    rows: list[dict], *, images: bool = True, index: bool = True, schema: pa.Schema | None = None
) -> pa.Table:
    """Rows -> a table in the v2 schema (``images=False``: the metadata-only twin; ``schema`` overrides)."""
    if schema is None:
        schema = PICKAPIC_V2 if images else PICKAPIC_V2_METADATA
        if not index:
            schema = schema.remove(schema.get_field_index("__index_level_0__"))
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def write_parquet(table: pa.Table, path, *, row_group_size: int | None = None, filesystem=None) -> None:
    """Write ``table``; a local ``path`` gets its parent directories created."""
    if filesystem is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size, filesystem=filesystem)


@dataclass
class QuirkRows:
    """Rows seeding every quirk, the reason each row must get ("" = kept), and the expected counts."""

    rows: list[dict] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, row: dict, reason: str = "") -> None:
        self.rows.append(row)
        self.reasons.append(reason)

    def expected_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reasons:
            if r:
                out[r] = out.get(r, 0) + 1
        return dict(sorted(out.items()))


# Ingest settings the quirk file is built for: a large PNG exceeds max_image_bytes, a mid-size
# bomb header exceeds max_image_pixels without reaching PIL's own limit.
QUIRK_MAX_IMAGE_BYTES = 20_000
QUIRK_MAX_IMAGE_PIXELS = 1_000_000


def quirk_file_rows(n_good: int = 12) -> QuirkRows:
    """Every quirk ingestion knows, once or more, between ``n_good`` valid rows.

    The ``n_good`` valid rows use ids 0..n_good-1; quirk rows use ids from 1000 so nothing collides.
    Images of rows 0, 1 and 2 share one image uid (``uid(0, 0)``) with the same bytes.
    """
    q = QuirkRows()
    good = [good_row(i) for i in range(n_good)]
    for i in (1, 2):  # one image uid in three kept rows
        good[i]["image_0_uid"] = uid(0, 0)
        good[i]["jpg_0"] = good[0]["jpg_0"]
        good[i]["best_image_uid"] = (uid(0, 0), good[i]["image_1_uid"])[i % 2]
    for r in good:
        q.add(r)

    def quirk(i: int, reason: str, **changes) -> None:
        row = good_row(1000 + i)
        row.update(changes)
        q.add(row, reason)

    quirk(0, "unlabeled", has_label=False)
    quirk(1, "unlabeled", has_label=False, label_0=0.5, label_1=0.5)  # unlabeled wins over tie
    quirk(2, "tie", label_0=0.5, label_1=0.5)
    quirk(3, "tie", label_0=0.5, label_1=0.5, caption=None)  # tie wins over missing caption
    quirk(4, "invalid_label", label_0=1.0, label_1=1.0)
    quirk(5, "invalid_label", best_image_uid="not-one-of-the-two")
    quirk(
        6, "invalid_label", label_0=0.0, label_1=1.0, best_image_uid=uid(1006, 0)
    )  # labels disagree with best
    quirk(7, "invalid_label", label_0=None)
    quirk(8, "identical_images", are_different=False)
    quirk(
        9, "identical_images", image_1_uid=uid(1009, 0), best_image_uid=uid(1009, 0), label_0=1.0, label_1=0.0
    )
    row = good_row(1010)
    quirk(10, "identical_images", jpg_1=row["jpg_0"])  # same bytes, different uids
    quirk(11, "missing_caption", caption=None)
    quirk(12, "missing_caption", caption="  \t ")
    quirk(13, "missing_user", user_id=None)
    quirk(14, "missing_created_at", created_at=None)
    quirk(15, "empty_image", jpg_0=b"")
    quirk(16, "empty_image", jpg_1=None)
    quirk(17, "undecodable_image", jpg_0=b"definitely not an image")
    quirk(18, "undecodable_image", jpg_1=truncated(image_bytes(5, size=48)))
    quirk(19, "unsupported_format", jpg_0=image_bytes(7, fmt="GIF"))
    quirk(20, "decompression_bomb", jpg_1=png_header_only(100_000, 100_000))  # PIL refuses it itself
    quirk(21, "decompression_bomb", jpg_0=png_header_only(2000, 2000))  # over max_image_pixels only
    quirk(22, "image_too_large", jpg_0=image_bytes(9, size=128, fmt="PNG"))  # ~49 KB > 20 KB
    # exact repeats of earlier rows (a kept one and a quarantined one) are duplicates
    q.add(dict(good[3]), "duplicate_row")
    q.add(dict(good[3]), "duplicate_row")
    q.add(dict(q.rows[n_good + 2]), "tie")  # a repeated tie is still a tie: earlier reasons come first
    # same comparison as good row 5 differing only in a model name: not a duplicate row, but the same pair id
    renamed = dict(good[5])
    renamed["model_1"] = "sd-b-renamed"
    q.add(renamed, "duplicate_pair")
    # same comparison as good row 4 with the labels flipped: the two rows contradict each other, so neither
    # is kept (the earlier, otherwise good row included); likewise good row 6 and a flipped row of its
    # ranking with another caption
    q.reasons[4] = q.reasons[6] = "conflicting_duplicate"
    q.add(flipped_label(good[4]), "conflicting_duplicate")
    q.add({**flipped_label(good[6]), "caption": "a watercolour of object 6"}, "conflicting_duplicate")
    for n, r in enumerate(
        q.rows
    ):  # a unique pandas index, as real files have (not part of duplicate detection)
        r["__index_level_0__"] = n
    return q


def flipped_label(row: dict) -> dict:
    """``row`` with its labels swapped: the other image preferred."""
    flipped = dict(row)
    flipped["label_0"], flipped["label_1"] = row["label_1"], row["label_0"]
    flipped["best_image_uid"] = (
        row["image_1_uid"] if row["best_image_uid"] == row["image_0_uid"] else row["image_0_uid"]
    )
    return flipped


def metadata_only(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in IMAGE_COLUMNS} for r in rows]

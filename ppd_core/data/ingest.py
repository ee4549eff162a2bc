"""The ``ingest`` stage body: Pick-a-Pic v2 Parquet -> oriented pairs, image shards, quarantine.

Every input row ends in exactly one place: ``pairs/`` (kept, winner/loser oriented) or
``quarantine/`` with the first reason that applies, checked in this order:

    unlabeled, tie, invalid_label, identical_images, missing_caption, missing_user,
    missing_created_at, duplicate_row, conflicting_duplicate, <image reasons for jpg_0 then jpg_1>,
    duplicate_pair

The cheap checks are vectorised over each Arrow batch; only rows that pass them reach the
per-row work (row digest, image header checks, pair id). ``duplicate_row`` means an exact repeat
of an earlier row in every Pick-a-Pic column, image bytes included (``__index_level_0__`` is a
row number, not data, and is left out). ``duplicate_pair`` (a second row with the same pair id,
i.e. the same user, caption, time, image pair and ranking, but differing elsewhere, for instance
in its model names) keeps ``pair_id`` unique in ``pairs/``. ``conflicting_duplicate``: rows of one
``ranking_id`` that contradict each other (a different preferred or dispreferred image, e.g. a flipped
label, whatever their captions) cannot all be true and none is trusted: every row of that ranking that
passes the cheap checks and is not an exact repeat goes to quarantine, the first one included. A pre-pass
over the metadata columns (no image bytes) finds those rankings before anything is written; rows that
fail a cheap check (ties, unlabelled, ...) state no preference and contradict nothing.

Memory is bounded by one Arrow batch (one Parquet row group read), the pair rows buffered for
row groups (``_BUFFER_BYTES`` per table), at most ``_MAX_OPEN_WRITERS`` open partition files, and
the cross-file dedupe sets: one 64-bit digest per row checked, per image written and per pair kept,
~8 bytes each (:class:`~ppd_core.data.images.DigestSet`). The images of an image uid seen again
are not re-checked or re-written: the first bytes seen for a uid are the ones stored.

Output (inside ``out_dir``)::

    pairs/created_date=YYYY-MM-DD/part-00000.parquet   schema PAIRS
    images/images-000000.tar ... sizes.json index.parquet   (absent when ingesting metadata only)
    quarantine/part-00000.parquet                       schema QUARANTINE (always written)

``created_date="YYYY-MM-DD"`` ingests only the rows created on that day (UTC for zoned
timestamps), the body of one backfill partition (:mod:`ppd_core.data.partitions`): row groups
whose ``created_at`` statistics exclude the day are not read, the other rows are skipped before
any check. Rows without ``created_at`` belong to no day and are left to a full ingest. Duplicate
rows and pair ids carry their creation time, so per-day deduplication matches the full ingest's.
Contradicting rows are looked for within the rows read, so rows of one ranking created on different
days are seen as contradicting by a full ingest only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ppd_core.config import IngestConfig
from ppd_core.data.images import (
    IMAGE_REASONS,
    INGEST_IMAGES,
    DigestSet,
    ImageShardWriter,
    accepted_formats,
    bomb_guard,
    check_image_unguarded,
    digest64,
    uid_digest,
)
from ppd_core.data.pickapic import SourceFile, check_schema, open_parquet
from ppd_core.errors import InputError, SchemaError
from ppd_core.schemas import (
    IMAGE_COLUMNS,
    PAIRS,
    PAIRS_PARTITION,
    PICKAPIC_V2,
    PICKAPIC_V2_METADATA,
    QUARANTINE,
)

ROW_REASONS = (
    "unlabeled",
    "tie",
    "invalid_label",
    "identical_images",
    "missing_caption",
    "missing_user",
    "missing_created_at",
)
REASONS = (*ROW_REASONS, "duplicate_row", "conflicting_duplicate", *IMAGE_REASONS, "duplicate_pair")
# Columns read and hashed for duplicate_row (all data columns; the pandas index is a row number).
META_COLUMNS = tuple(n for n in PICKAPIC_V2_METADATA.names if n != "__index_level_0__")
VERSION = "2"  # the ingest stage's code version: bump it when the same input gives other output
PAIR_ID_HEX = 20  # 80-bit content id
_ROW_GROUP_ROWS = 65_536  # most rows per Parquet row group in pairs/ and quarantine/
_BUFFER_BYTES = 4 << 20  # most Arrow bytes buffered across partitions before the largest is flushed
_MAX_OPEN_WRITERS = 32  # open partition files; the least recently used is finished beyond this
_COMPACT_PIECES = 32  # a partition's buffered tables are merged into one at this count

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------- writers


class _PartitionedWriter:
    """Streams tables into ``<root>/[<key>/]part-NNNNN.parquet``, one writer per partition.

    Rows are buffered per partition into row groups of up to ``_ROW_GROUP_ROWS``; beyond
    ``_BUFFER_BYTES`` in total the largest buffer is flushed early (smaller row groups, bounded
    memory). Files are written as ``*.tmp`` and renamed when finished: rotated at ``rows_per_file``,
    or evicted (least recently used) beyond ``_MAX_OPEN_WRITERS`` open ones, the partition then
    continuing in its next part file.
    """

    def __init__(self, root: Path, schema: pa.Schema, rows_per_file: int, dictionary: list[str]):
        self.root, self.schema, self.rows_per_file = root, schema, rows_per_file
        # dictionary-encode only low-cardinality columns: an open writer keeps its dictionary
        # encoders' memory (~half a row group's bytes), pointless for unique ids and captions
        self.dictionary = dictionary
        root.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, int] = {}  # partition -> rows written
        self._buffers: dict[str, list[pa.Table]] = {}
        self._buffered: dict[str, int] = {}  # partition -> buffered rows
        self._bytes: dict[str, int] = {}  # partition -> buffered Arrow bytes
        self._writers: OrderedDict[str, tuple[pq.ParquetWriter, Path, int]] = OrderedDict()
        self._next_part: dict[str, int] = {}

    def add(self, key: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.rows[key] = self.rows.get(key, 0) + table.num_rows
        pieces = self._buffers.setdefault(key, [])
        pieces.append(table)
        if len(pieces) >= _COMPACT_PIECES:
            # many small tables cost far more than their nbytes (per-buffer allocation and padding)
            pieces[:] = [pa.concat_tables(pieces).combine_chunks()]
        self._buffered[key] = self._buffered.get(key, 0) + table.num_rows
        self._bytes[key] = self._bytes.get(key, 0) + table.nbytes
        if self._buffered[key] >= _ROW_GROUP_ROWS:
            self._flush(key)
        while self._bytes and sum(self._bytes.values()) > _BUFFER_BYTES:
            self._flush(max(self._bytes, key=self._bytes.__getitem__))

    def _flush(self, key: str) -> None:
        table = pa.concat_tables(self._buffers.pop(key))
        del self._buffered[key], self._bytes[key]
        while table.num_rows:
            writer, path, written = self._writer(key)
            take = min(table.num_rows, self.rows_per_file - written)
            writer.write_table(table.slice(0, take), row_group_size=_ROW_GROUP_ROWS)
            table = table.slice(take)
            self._writers[key] = (writer, path, written + take)
            if written + take >= self.rows_per_file:
                self._finish(key)

    def _writer(self, key: str) -> tuple[pq.ParquetWriter, Path, int]:
        if key in self._writers:
            self._writers.move_to_end(key)
            return self._writers[key]
        if len(self._writers) >= _MAX_OPEN_WRITERS:
            self._finish(next(iter(self._writers)))
        part = self._next_part.get(key, 0)
        self._next_part[key] = part + 1
        directory = self.root / key if key else self.root
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"part-{part:05d}.parquet"
        writer = pq.ParquetWriter(
            path.with_name(path.name + ".tmp"),
            self.schema,
            compression="zstd",
            use_dictionary=self.dictionary,
        )
        self._writers[key] = (writer, path, 0)
        return self._writers[key]

    def _finish(self, key: str) -> None:
        writer, path, _ = self._writers.pop(key)
        writer.close()
        os.replace(path.with_name(path.name + ".tmp"), path)

    def close(self, ensure: str | None = None) -> dict[str, int]:
        """Flush and finish every file; ``ensure`` names a partition that gets a file even when empty."""
        for key in list(self._buffers):
            self._flush(key)
        if ensure is not None and ensure not in self.rows and ensure not in self._writers:
            self._writer(ensure)
        for key in list(self._writers):
            self._finish(key)
        return dict(sorted(self.rows.items()))

    def abort(self) -> None:
        for writer, _, _ in self._writers.values():
            writer.close()
        self._writers.clear()


# -------------------------------------------------------------------------------------- vectorised


def _np(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean Arrow mask -> numpy bool, null counting as False."""
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def _row_reason_codes(batch: pa.RecordBatch, images: bool) -> np.ndarray:
    """Per row: 0 when the row passes every cheap check, else 1 + index of its first reason in ROW_REASONS."""
    col = batch.column
    l0, l1, best, u0, u1 = (
        col("label_0"),
        col("label_1"),
        col("best_image_uid"),
        col("image_0_uid"),
        col("image_1_uid"),
    )
    best0, best1 = pc.equal(best, u0), pc.equal(best, u1)
    labels_ok = pc.or_(
        pc.and_(pc.equal(l0, 1.0), pc.equal(l1, 0.0)),
        pc.and_(pc.equal(l0, 0.0), pc.equal(l1, 1.0)),
    )
    # the preferred uid must be the side labelled 1 (with equal uids either side agrees)
    agrees = pc.or_(pc.and_(best0, pc.equal(l0, 1.0)), pc.and_(best1, pc.equal(l1, 1.0)))
    identical = _np(pc.invert(col("are_different"))) | _np(pc.equal(u0, u1))
    if images:
        identical |= _np(pc.equal(col("jpg_0"), col("jpg_1")))
    caption = col("caption")
    masks = [
        ~_np(col("has_label")),
        _np(pc.equal(l0, 0.5)),
        ~(_np(labels_ok) & _np(agrees)),
        identical,
        _np(pc.is_null(caption)) | _np(pc.equal(pc.utf8_trim_whitespace(caption), "")),
        _np(pc.is_null(col("user_id"))),
        _np(pc.is_null(col("created_at"))),
    ]
    codes = np.zeros(batch.num_rows, np.int8)
    for code in range(len(masks), 0, -1):  # last to first, so the first reason that applies wins
        codes[masks[code - 1]] = code
    return codes


def _validity(arr: pa.Array) -> np.ndarray:
    """bool ``(N,)``: True where the value is not null (read from the bitmap, no compute call)."""
    bitmap = arr.buffers()[0]
    if bitmap is None:
        return np.ones(len(arr), bool)
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return bits[arr.offset : arr.offset + len(arr)].astype(bool)


def _row_digests(batch: pa.RecordBatch, columns: tuple[str, ...]) -> list[int]:
    """64-bit digest of every row over ``columns`` (image bytes included when read).

    Each row is encoded unambiguously as its string/binary values back to back followed by a
    fixed-width record (per variable column its byte length or -1 for null; per fixed column its
    8 raw bytes, or the bit for a bool, and a null flag), then hashed. Built from the Arrow
    buffers with numpy and one join, because ~90 compute calls per batch cost more than the hashing.
    Expects the exact PICKAPIC_V2 types (see :func:`_normalise`).
    """
    n = batch.num_rows
    variable: list[pa.Array] = []
    fixed: list[np.ndarray] = []  # (n, width) uint8 blocks
    for name in columns:
        arr = batch.column(name)
        valid = _validity(arr)
        t = arr.type
        if pa.types.is_string(t) or pa.types.is_binary(t):
            offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, 4 * arr.offset)
            lengths = np.diff(offsets).astype(np.int64)
            lengths[~valid] = -1
            fixed.append(lengths.view(np.uint8).reshape(n, 8))
            variable.append(pa.Array.from_buffers(pa.binary(), n, arr.buffers()[:3], offset=arr.offset))
        elif pa.types.is_boolean(t):
            bits = np.unpackbits(np.frombuffer(arr.buffers()[1], np.uint8), bitorder="little")
            value = bits[arr.offset : arr.offset + n].astype(np.uint8)
            value[~valid] = 2
            fixed.append(value.reshape(n, 1))
        else:  # int64, float64, timestamp[ns]: 8 bytes each
            value = np.frombuffer(arr.buffers()[1], np.uint64, n, 8 * arr.offset).copy()
            value[~valid] = 0
            fixed.append(value.view(np.uint8).reshape(n, 8))
            fixed.append(valid.astype(np.uint8).reshape(n, 1))
    block = np.ascontiguousarray(np.hstack(fixed))  # (n, width)
    record = pa.FixedSizeBinaryArray.from_buffers(pa.binary(block.shape[1]), n, [None, pa.py_buffer(block)])
    options = pc.JoinOptions(null_handling="replace", null_replacement="")
    joined = pc.binary_join_element_wise(*variable, record.cast(pa.binary()), b"", options=options)
    return [digest64(v) for v in joined.to_pylist()]


def _pair_ids(batch: pa.RecordBatch) -> list[str]:
    """Stable content id: user | created_at ns | sorted image uids | ranking_id | caption (free text last)."""
    col = batch.column
    parts = [
        pc.cast(col("user_id"), pa.string()),
        pc.cast(pc.cast(col("created_at"), pa.int64()), pa.string()),
        pc.min_element_wise(col("image_0_uid"), col("image_1_uid")),
        pc.max_element_wise(col("image_0_uid"), col("image_1_uid")),
        pc.fill_null(pc.cast(col("ranking_id"), pa.string()), ""),
        col("caption"),
    ]
    joined = pc.binary_join_element_wise(*parts, "|")
    return [hashlib.sha256(v.encode()).hexdigest()[:PAIR_ID_HEX] for v in joined.to_pylist()]


def _oriented_pairs(batch: pa.RecordBatch, pair_ids: list[str], source: str, rows: np.ndarray) -> pa.Table:
    """PAIRS rows for a batch of kept rows: the best_image_uid side is the winner."""
    col = batch.column
    side0 = pc.equal(col("best_image_uid"), col("image_0_uid"))
    return pa.table(
        {
            "pair_id": pa.array(pair_ids, pa.string()),
            "ranking_id": col("ranking_id"),
            "user_id": col("user_id"),
            "caption": col("caption"),
            "created_at": col("created_at"),
            "winner_uid": pc.if_else(side0, col("image_0_uid"), col("image_1_uid")),
            "loser_uid": pc.if_else(side0, col("image_1_uid"), col("image_0_uid")),
            "winner_model": pc.if_else(side0, col("model_0"), col("model_1")),
            "loser_model": pc.if_else(side0, col("model_1"), col("model_0")),
            "num_example_per_prompt": col("num_example_per_prompt"),
            "source_file": pa.array([source] * len(rows), pa.string()),
            "source_row": pa.array(rows, pa.int64()),
        },
        schema=PAIRS,
    )


def _text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _row_detail(reason: str, row: dict) -> str:
    """Human-readable detail for a cheap-check reason (quarantined rows only, so per-row Python is fine)."""
    if reason == "unlabeled":
        return f"has_label is {_text(row['has_label'])}"
    if reason == "tie":
        return f"label_0 = {_text(row['label_0'])}, label_1 = {_text(row['label_1'])}"
    if reason == "invalid_label":
        best = row["best_image_uid"]
        where = (
            "matches image_0_uid"
            if best is not None and best == row["image_0_uid"]
            else "matches image_1_uid"
            if best is not None and best == row["image_1_uid"]
            else "matches neither image uid"
        )
        return f"label_0 = {_text(row['label_0'])}, label_1 = {_text(row['label_1'])}, best_image_uid {where}"
    if reason == "identical_images":
        if row["are_different"] is False:
            return "are_different is false"
        if row["image_0_uid"] == row["image_1_uid"]:
            return "image_0_uid equals image_1_uid"
        return "jpg_0 and jpg_1 are the same bytes"
    if reason == "missing_caption":
        return "caption is null" if row["caption"] is None else "caption is blank"
    return {"missing_user": "user_id is null", "missing_created_at": "created_at is null"}[reason]


# ------------------------------------------------------------------------------------------- stage


def utc_date(value: dt.datetime) -> dt.date:
    """The day of a timestamp as ingestion partitions it: naive values as they are, zoned ones in UTC."""
    return (value.astimezone(dt.UTC) if value.tzinfo is not None else value).date()


def created_at_stats(pf: pq.ParquetFile, group: int) -> tuple[dt.date, dt.date] | None:
    """(first day, last day) of ``created_at`` in one row group from its statistics, None when unknown."""
    meta = pf.metadata.row_group(group)
    for j in range(meta.num_columns):
        column = meta.column(j)
        if column.path_in_schema == "created_at":
            stats = column.statistics
            if stats is None or not stats.has_min_max:
                return None
            lo, hi = stats.min, stats.max
            if not (isinstance(lo, dt.datetime) and isinstance(hi, dt.datetime)):
                return None
            return utc_date(lo), utc_date(hi)
    return None


def _row_groups(pf: pq.ParquetFile, day: dt.date | None) -> list[tuple[int, int]] | None:
    """(row group, its first row) of the groups that may hold rows of ``day``; None (all) without a day."""
    if day is None:
        return None
    groups, first = [], 0
    for g in range(pf.metadata.num_row_groups):
        span = created_at_stats(pf, g)
        if span is None or span[0] <= day <= span[1]:
            groups.append((g, first))
        first += pf.metadata.row_group(g).num_rows
    return groups


def _scanned_rows(pf: pq.ParquetFile, day: dt.date | None) -> int:
    groups = _row_groups(pf, day)
    if groups is None:
        return pf.metadata.num_rows
    return sum(pf.metadata.row_group(g).num_rows for g, _ in groups)


def _plan(cfg: IngestConfig, files: list[SourceFile], day: dt.date | None = None) -> tuple[bool, int]:
    """Check every file's schema before writing anything; returns (read images, rows to scan)."""
    if not files:
        raise InputError("ingest: no source files given")
    with_images, without, total = [], [], 0
    for f in files:
        pf = open_parquet(f)
        try:
            (with_images if check_schema(pf.schema_arrow, f.url, cfg.images) else without).append(f.url)
            total += _scanned_rows(pf, day)
        finally:
            pf.close()
    if with_images and without:
        raise SchemaError(
            f"{without[0]}: has no image columns jpg_0/jpg_1 but {with_images[0]} has them; "
            "ingest files of one kind, or set ingest.images=none to ingest metadata only"
        )
    return bool(with_images), total


def _normalise(batch: pa.RecordBatch, url: str) -> pa.RecordBatch:
    """Cast equivalent types (large_string, timestamp[us], dictionary...) to the PICKAPIC_V2 ones."""
    arrays = []
    for name, arr in zip(batch.schema.names, batch.columns, strict=True):
        want = PICKAPIC_V2.field(name).type
        if arr.type != want:
            try:
                arr = pc.cast(arr, want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InputError(f"{url}: column {name!r}: cannot read {arr.type} as {want} ({e})") from e
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _verdict_digests(batch: pa.RecordBatch) -> np.ndarray:
    """uint64 per row: a digest of (preferred uid, dispreferred uid), what the row says about its ranking."""
    col = batch.column
    side0 = pc.equal(col("best_image_uid"), col("image_0_uid"))
    winner = pc.if_else(side0, col("image_0_uid"), col("image_1_uid"))
    loser = pc.if_else(side0, col("image_1_uid"), col("image_0_uid"))
    joined = pc.binary_join_element_wise(winner, loser, "|")
    return np.fromiter((digest64(v.encode()) for v in joined.to_pylist()), np.uint64, batch.num_rows)


def conflicting_rankings(cfg: IngestConfig, files: list[SourceFile], day: dt.date | None = None) -> set[int]:
    """``ranking_id``s whose rows disagree on the preferred/dispreferred image (e.g. a flipped label).

    Reads only the metadata columns (no image bytes); rows failing a cheap check state no preference
    and are left out. Memory: 16 bytes per row read."""
    rids: list[np.ndarray] = []
    verdicts: list[np.ndarray] = []
    for file in files:
        pf = open_parquet(file)
        try:
            groups = _row_groups(pf, day)
            if groups == []:
                continue
            try:
                for batch in pf.iter_batches(
                    batch_size=cfg.batch_rows,
                    row_groups=None if groups is None else [g for g, _ in groups],
                    columns=list(META_COLUMNS),
                ):
                    batch = _normalise(batch, file.url)
                    keep = _row_reason_codes(batch, images=False) == 0
                    keep &= _validity(batch.column("ranking_id"))
                    if day is not None:
                        keep &= _np(pc.equal(pc.cast(batch.column("created_at"), pa.date32()), day))
                    if keep.any():
                        sub = batch.filter(pa.array(keep))
                        rids.append(sub.column("ranking_id").to_numpy(zero_copy_only=False).astype(np.int64))
                        verdicts.append(_verdict_digests(sub))
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{file.url}: not a readable Parquet file ({e})") from e
        finally:
            pf.close()
    if not rids:
        return set()
    pairs = np.unique(np.stack([np.concatenate(rids).view(np.uint64), np.concatenate(verdicts)], 1), axis=0)
    ranking, count = np.unique(pairs[:, 0], return_counts=True)
    return {int(r) for r in ranking[count > 1].view(np.int64)}


class _Ingestor:
    """State carried across batches and files: writers, dedupe sets, counts."""

    def __init__(self, cfg: IngestConfig, out_dir: Path, images: bool, conflicts: set[int] = frozenset()):
        self.cfg, self.images, self.conflicts = cfg, images, conflicts
        self.columns = META_COLUMNS + (IMAGE_COLUMNS if images else ())
        self.formats = accepted_formats(cfg)
        self.pairs = _PartitionedWriter(
            out_dir / "pairs",
            PAIRS,
            cfg.pairs_rows_per_file,
            ["user_id", "winner_model", "loser_model", "source_file"],
        )
        self.quarantine = _PartitionedWriter(
            out_dir / "quarantine", QUARANTINE, 2**62, ["source_file", "reason"]
        )
        self.image_writer = (
            ImageShardWriter(out_dir / INGEST_IMAGES, cfg.shard_max_images) if images else None
        )
        self.row_digests = DigestSet()
        self.pair_digests = DigestSet()
        self.by_reason = dict.fromkeys(REASONS, 0)
        self.per_file: dict[str, dict[str, int]] = {}

    def run_file(
        self, file: SourceFile, done: int, total: int, progress: Progress | None, day: dt.date | None = None
    ) -> int:
        counts = self.per_file.setdefault(file.url, {"input": 0, "kept": 0, "quarantined": 0})
        pf = open_parquet(file)
        try:
            for row0, batch in self._batches(pf, file.url, day):
                n = batch.num_rows
                rows = np.arange(row0, row0 + n, dtype=np.int64)  # source row of every batch row
                batch = _normalise(batch, file.url)
                if day is not None:
                    on_day = _np(pc.equal(pc.cast(batch.column("created_at"), pa.date32()), day))
                    batch, rows = batch.filter(pa.array(on_day)), rows[on_day]
                kept = self.run_batch(batch, file.url, rows)
                counts["input"] += batch.num_rows
                counts["kept"] += kept
                counts["quarantined"] += batch.num_rows - kept
                done += n
                if progress is not None:
                    progress(done, total)
        finally:
            pf.close()
        return done

    def _batches(self, pf: pq.ParquetFile, url: str, day: dt.date | None):
        """``(first source row, batch)`` over the file, or over the row groups that may hold ``day``."""
        groups = _row_groups(pf, day)
        streams = [(0, None)] if groups is None else [(first, [g]) for g, first in groups]
        for row0, row_groups in streams:
            batches = pf.iter_batches(
                batch_size=self.cfg.batch_rows, row_groups=row_groups, columns=list(self.columns)
            )
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as e:
                    raise InputError(f"{url}: not a readable Parquet file ({e})") from e
                if batch is None:
                    break
                yield row0, batch
                row0 += batch.num_rows

    def run_batch(self, batch: pa.RecordBatch, url: str, source_rows: np.ndarray) -> int:
        """Route every row of ``batch`` (``source_rows``: their row numbers in the file); returns how many were
        kept. Stages narrow ``alive`` (positions in ``sub``, the rows that passed the cheap checks)
        in reason order."""
        codes = _row_reason_codes(batch, self.images)
        reasons: dict[int, tuple[str, str]] = {}  # batch row -> (reason, detail)
        bad = np.flatnonzero(codes)
        if len(bad):
            rows = batch.select(list(META_COLUMNS)).take(pa.array(bad)).to_pylist()
            for i, row in zip(bad.tolist(), rows, strict=True):
                reason = ROW_REASONS[codes[i] - 1]
                reasons[i] = (reason, _row_detail(reason, row))
        cand = np.flatnonzero(codes == 0)  # batch rows passing the cheap checks
        kept = np.empty(0, np.int64)
        if len(cand):
            sub = batch.take(pa.array(cand))
            # duplicate_row: every row reaching this check registers its digest, in input order
            fresh = self.row_digests.add_many(_row_digests(sub, self.columns))
            for j in np.flatnonzero(~fresh).tolist():
                reasons[int(cand[j])] = ("duplicate_row", "exact repeat of an earlier row")
            alive = np.flatnonzero(fresh)
            if self.conflicts and len(alive):
                alive = self._drop_conflicting(sub, alive, cand, reasons)
            if self.images and len(alive):
                alive, checks = self._check_images(sub, alive, cand, reasons)
            # duplicate_pair: only kept rows register their pair id
            pair_ids = _pair_ids(sub.take(pa.array(alive))) if len(alive) else []
            fresh = self.pair_digests.add_many([int(p[:16], 16) for p in pair_ids])  # first 64 bits
            for k in np.flatnonzero(~fresh).tolist():
                reasons[int(cand[alive[k]])] = (
                    "duplicate_pair",
                    f"pair_id {pair_ids[k]} already kept from an earlier row",
                )
            kept = alive[fresh]
            if len(kept):
                if self.images:
                    self._write_images(kept, checks)
                kept_ids = [p for p, f in zip(pair_ids, fresh.tolist(), strict=True) if f]
                self._write_pairs(sub.take(pa.array(kept)), kept_ids, url, source_rows[cand[kept]])
        self._write_quarantine(batch, reasons, url, source_rows)
        return len(kept)

    def _drop_conflicting(
        self, sub: pa.RecordBatch, alive: np.ndarray, cand: np.ndarray, reasons: dict
    ) -> np.ndarray:
        """Quarantine the ``alive`` rows of a ranking whose rows contradict each other; the rest stay alive."""
        rids = sub.column("ranking_id").take(pa.array(alive)).to_pylist()
        bad = np.array([r is not None and r in self.conflicts for r in rids], bool)
        for j, rid in zip(alive[bad].tolist(), np.asarray(rids, object)[bad].tolist(), strict=True):
            reasons[int(cand[j])] = (
                "conflicting_duplicate",
                f"ranking_id {rid} has rows that disagree on the preferred image; none is kept",
            )
        return alive[~bad]

    def _check_images(
        self, sub: pa.RecordBatch, alive: np.ndarray, cand: np.ndarray, reasons: dict
    ) -> tuple[np.ndarray, dict[int, tuple]]:
        """Header (or full) checks of both images of the ``alive`` rows of ``sub``. Images whose uid
        is already written were checked then and are skipped (check None). Returns the rows that
        pass and, by position in ``sub``, what writing their images needs."""
        picked = pa.array(alive)
        uids = [sub.column(f"image_{s}_uid").take(picked).to_pylist() for s in (0, 1)]
        data = [sub.column(f"jpg_{s}").take(picked).to_pylist() for s in (0, 1)]
        digests = [[uid_digest(u) for u in side] for side in uids]
        known = [self.image_writer.known(d).tolist() for d in digests]
        cfg, formats = self.cfg, self.formats
        passed: list[int] = []
        todo: dict[int, tuple] = {}
        with bomb_guard():
            for k, j in enumerate(alive.tolist()):
                c0 = None if known[0][k] else check_image_unguarded(data[0][k], cfg, formats)
                c1 = None if known[1][k] else check_image_unguarded(data[1][k], cfg, formats)
                bad0, bad1 = c0 is not None and not c0.ok, c1 is not None and not c1.ok
                if bad0 or bad1:
                    failed = [f"jpg_{s}: {c.detail}" for s, c, bad in ((0, c0, bad0), (1, c1, bad1)) if bad]
                    reasons[int(cand[j])] = ((c0 if bad0 else c1).reason, "; ".join(failed))
                    continue
                passed.append(j)
                todo[j] = (
                    (uids[0][k], data[0][k], c0, digests[0][k]),
                    (uids[1][k], data[1][k], c1, digests[1][k]),
                )
        return np.asarray(passed, np.int64), todo

    def _write_images(self, kept: np.ndarray, todo: dict[int, tuple]) -> None:
        """Images of kept rows only, each uid once (the writer dedupes)."""
        add = self.image_writer.add
        for j in kept.tolist():
            for uid, data, check, digest in todo[j]:
                if check is not None:
                    add(uid, data, check, digest=digest)

    def _write_pairs(self, kept: pa.RecordBatch, pair_ids: list[str], url: str, rows: np.ndarray) -> None:
        table = _oriented_pairs(kept, pair_ids, url, rows)
        days = pc.cast(kept.column("created_at"), pa.date32()).to_numpy(zero_copy_only=False).astype("int64")
        for day in np.unique(days):
            date = (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).isoformat()
            self.pairs.add(f"{PAIRS_PARTITION}={date}", table.filter(pa.array(days == day)))

    def _write_quarantine(
        self, batch: pa.RecordBatch, reasons: dict[int, tuple[str, str]], url: str, source_rows: np.ndarray
    ) -> None:
        if not reasons:
            return
        rows = sorted(reasons)
        idx = pa.array(rows)
        for reason, _ in reasons.values():
            self.by_reason[reason] += 1
        table = pa.table(
            {
                "source_file": pa.array([url] * len(rows), pa.string()),
                "source_row": pa.array(source_rows[rows], pa.int64()),
                "ranking_id": batch.column("ranking_id").take(idx),
                "user_id": batch.column("user_id").take(idx),
                "reason": pa.array([reasons[i][0] for i in rows], pa.string()),
                "detail": pa.array([reasons[i][1] for i in rows], pa.string()),
            },
            schema=QUARANTINE,
        )
        self.quarantine.add("", table)

    def close(self) -> dict:
        partitions = {k.split("=", 1)[1]: n for k, n in self.pairs.close().items()}
        self.quarantine.close(ensure="")
        image_counts = self.image_writer.close() if self.image_writer else {"images": 0, "shards": 0}
        return {"partitions": partitions, **image_counts}

    def abort(self) -> None:
        self.pairs.abort()
        self.quarantine.abort()
        if self.image_writer:
            self.image_writer.abort()


def ingest(
    cfg: IngestConfig,
    files: list[SourceFile],
    out_dir: Path,
    progress: Progress | None = None,
    created_date: str | None = None,
) -> dict:
    """Stream ``files`` batch by batch into ``out_dir``; returns JSON-able counts for the manifest.

    Every file's schema is checked before anything is written. ``progress(rows_done, rows_total)``
    is called after each batch (totals from the Parquet footers). ``created_date`` (YYYY-MM-DD)
    keeps only that day's rows: ``input_rows`` then counts the rows of that day.
    """
    out_dir = Path(out_dir)
    day = None if created_date is None else dt.date.fromisoformat(created_date)
    images, total = _plan(cfg, files, day)
    state = _Ingestor(cfg, out_dir, images, conflicting_rankings(cfg, files, day))
    done = 0
    try:
        for file in files:
            done = state.run_file(file, done, total, progress, day)
        written = state.close()
    except BaseException:
        state.abort()
        raise
    per_file = state.per_file
    input_rows = sum(c["input"] for c in per_file.values())
    kept_rows = sum(c["kept"] for c in per_file.values())
    quarantined = sum(c["quarantined"] for c in per_file.values())
    by_reason = {r: n for r, n in state.by_reason.items() if n}
    counts = {
        "input_rows": input_rows,
        "kept_rows": kept_rows,
        "quarantined": quarantined,
        "quarantine_by_reason": by_reason,
        "per_file": per_file,
        "partitions": written["partitions"],
        "images_written": written["images"],
        "image_shards": written["shards"],
        "has_images": images,
    }
    if created_date is not None:
        counts["created_date"] = created_date
    # explicit checks (not `assert`, which -O strips): every row is accounted for exactly once
    if not (
        input_rows == kept_rows + quarantined
        and (day is not None or input_rows == total)
        and sum(by_reason.values()) == quarantined
        and sum(written["partitions"].values()) == kept_rows
    ):
        raise AssertionError(f"ingest accounting is inconsistent: {counts}")
    return counts

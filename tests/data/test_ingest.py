"""Ingestion of Pick-a-Pic v2 Parquet (ppd_core.data.pickapic, ppd_core.data.ingest)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from ppd_core.config import IngestConfig
from ppd_core.data.images import ImageStore
from ppd_core.data.ingest import REASONS, ingest
from ppd_core.data.pickapic import check_schema, open_parquet, resolve_source, source_identity
from ppd_core.errors import InputError, SchemaError
from ppd_core.schemas import PAIRS, PICKAPIC_V2, PICKAPIC_V2_METADATA, QUARANTINE
from tests.data.pickapic_factory import (
    QUIRK_MAX_IMAGE_BYTES,
    QUIRK_MAX_IMAGE_PIXELS,
    flipped_label,
    good_row,
    metadata_only,
    quirk_file_rows,
    to_table,
    uid,
    write_parquet,
)

CFG = IngestConfig(
    batch_rows=8, max_image_bytes=QUIRK_MAX_IMAGE_BYTES, max_image_pixels=QUIRK_MAX_IMAGE_PIXELS
)


def _write(path: Path, rows: list[dict], **kw) -> Path:
    write_parquet(to_table(rows, **kw), path, row_group_size=10)
    return path


def _run(tmp_path: Path, source: str | Path, cfg: IngestConfig = CFG, **kw) -> tuple[dict, Path]:
    out = tmp_path / "out"
    return ingest(cfg, resolve_source(str(source)), out, **kw), out


def _pairs(out: Path) -> pa.Table:
    return ds.dataset(out / "pairs", format="parquet", partitioning="hive").to_table()


def _quarantine(out: Path) -> pa.Table:
    return pq.read_table(out / "quarantine" / "part-00000.parquet")


# ------------------------------------------------------------------------------------ schema checks


def test_missing_column_names_file_and_column(tmp_path):
    table = to_table([good_row(0)]).drop_columns(["user_id"])
    write_parquet(table, tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"bad\.parquet.*missing column 'user_id' \(expected int64\)"):
        _run(tmp_path, tmp_path / "bad.parquet")


def test_wrong_dtype_names_file_column_and_both_types(tmp_path):
    table = to_table([good_row(0)])
    i = table.schema.get_field_index("label_0")
    table = table.set_column(i, "label_0", pa.array(["1.0"]))
    write_parquet(table, tmp_path / "typed.parquet")
    with pytest.raises(
        SchemaError, match=r"typed\.parquet.*column 'label_0' has type string, expected double"
    ):
        _run(tmp_path, tmp_path / "typed.parquet")


def test_truncated_parquet_is_an_input_error_naming_the_file(tmp_path):
    path = _write(tmp_path / "src" / "cut.parquet", [good_row(i) for i in range(3)])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cut\.parquet: not a readable Parquet file"):
        _run(tmp_path, path)


def test_not_parquet_is_an_input_error(tmp_path):
    (tmp_path / "notes.parquet").write_text("hello")
    [file] = resolve_source(str(tmp_path / "notes.parquet"))
    with pytest.raises(InputError, match=r"notes\.parquet: not a readable Parquet file"):
        open_parquet(file)


def test_equivalent_types_and_optional_columns_are_accepted(tmp_path):
    """large_string / large_binary / timestamp[us, UTC], no pandas index, an extra column: all fine."""
    rows = [good_row(i) for i in range(4)]
    base = to_table(rows, index=False)
    fields = []
    for f in base.schema:
        t = {pa.string(): pa.large_string(), pa.binary(): pa.large_binary()}.get(f.type, f.type)
        fields.append(pa.field(f.name, pa.timestamp("us", tz="UTC") if f.name == "created_at" else t))
    table = base.cast(pa.schema(fields)).append_column("aesthetic", pa.array([1.0] * 4))
    write_parquet(table, tmp_path / "src" / "variant.parquet")
    assert check_schema(table.schema, "variant.parquet", "auto") is True
    counts, out = _run(tmp_path, tmp_path / "src")
    assert counts["kept_rows"] == 4 and counts["images_written"] == 8
    assert _pairs(out).column("created_at").type == pa.timestamp("ns")


@pytest.mark.parametrize(
    ("schema", "images", "reads_images"),
    [
        (PICKAPIC_V2, "auto", True),
        (PICKAPIC_V2, "required", True),
        (PICKAPIC_V2, "none", False),
        (PICKAPIC_V2_METADATA, "auto", False),
        (PICKAPIC_V2_METADATA, "none", False),
    ],
)
def test_check_schema_says_whether_images_are_read(schema, images, reads_images):
    assert check_schema(schema, "x.parquet", images) is reads_images


def test_one_image_column_alone_is_a_damaged_file():
    schema = PICKAPIC_V2.remove(PICKAPIC_V2.get_field_index("jpg_1"))
    with pytest.raises(SchemaError, match=r"x\.parquet.*missing column 'jpg_1' \(expected binary\)"):
        check_schema(schema, "x.parquet", "auto")


def test_images_required_needs_image_columns(tmp_path):
    _write(tmp_path / "meta.parquet", metadata_only([good_row(0)]), images=False)
    with pytest.raises(SchemaError, match=r"meta\.parquet.*missing column 'jpg_0'.*images=none"):
        _run(tmp_path, tmp_path / "meta.parquet", CFG.model_copy(update={"images": "required"}))


def test_mixing_files_with_and_without_images_is_refused(tmp_path):
    _write(tmp_path / "src" / "a.parquet", [good_row(0)])
    _write(tmp_path / "src" / "b.parquet", metadata_only([good_row(1)]), images=False)
    with pytest.raises(SchemaError, match=r"b\.parquet: has no image columns"):
        _run(tmp_path, tmp_path / "src")
    counts, out = _run(tmp_path, tmp_path / "src", CFG.model_copy(update={"images": "none"}))
    assert counts["kept_rows"] == 2 and not (out / "images").exists()


# ---------------------------------------------------------------------------------------- accounting


def test_every_row_is_accounted_for_with_the_first_reason(tmp_path):
    quirks = quirk_file_rows()
    _write(tmp_path / "src" / "quirks.parquet", quirks.rows)
    counts, out = _run(tmp_path, tmp_path / "src")
    expected = quirks.expected_counts()
    assert counts["quarantine_by_reason"] == expected
    assert set(expected) == set(REASONS)  # the quirk file exercises every reason
    n = len(quirks.rows)
    kept = quirks.reasons.count("")
    assert (counts["input_rows"], counts["kept_rows"], counts["quarantined"]) == (n, kept, n - kept)
    path = str(tmp_path / "src" / "quirks.parquet")
    assert counts["per_file"] == {path: {"input": n, "kept": kept, "quarantined": n - kept}}
    quarantine = _quarantine(out)
    assert quarantine.schema == QUARANTINE
    got = {r["source_row"]: r["reason"] for r in quarantine.to_pylist()}
    assert got == {i: r for i, r in enumerate(quirks.reasons) if r}
    pairs = _pairs(out)
    assert sorted(pairs.column("source_row").to_pylist()) == [
        i for i, r in enumerate(quirks.reasons) if not r
    ]
    assert len(set(pairs.column("pair_id").to_pylist())) == kept


def test_quarantine_details_say_which_image(tmp_path):
    quirks = quirk_file_rows()
    _write(tmp_path / "src" / "quirks.parquet", quirks.rows)
    _, out = _run(tmp_path, tmp_path / "src")
    details = {r["reason"]: r["detail"] for r in _quarantine(out).to_pylist()}
    assert details["unsupported_format"].startswith("jpg_0: GIF")
    assert details["undecodable_image"].startswith("jpg_") and details["image_too_large"].startswith("jpg_0:")
    assert details["missing_user"] == "user_id is null"


def test_duplicate_rows_across_files(tmp_path):
    rows = [good_row(i) for i in range(3)]
    _write(tmp_path / "src" / "a.parquet", rows)
    _write(tmp_path / "src" / "b.parquet", [rows[1], good_row(7)])
    counts, _ = _run(tmp_path, tmp_path / "src")
    assert counts["quarantine_by_reason"] == {"duplicate_row": 1}
    assert counts["per_file"][str(tmp_path / "src" / "b.parquet")] == {
        "input": 2,
        "kept": 1,
        "quarantined": 1,
    }


def test_null_and_empty_values_are_not_the_same_row(tmp_path):
    """model_1 null vs "": not an exact repeat, but the same comparison, so a duplicate pair."""
    first, second = good_row(0), good_row(0)
    first["model_1"], second["model_1"] = None, ""
    _write(tmp_path / "src" / "a.parquet", [first, second])
    counts, _ = _run(tmp_path, tmp_path / "src")
    assert counts["quarantine_by_reason"] == {"duplicate_pair": 1}


@pytest.mark.parametrize("other_caption", [False, True])
def test_contradicting_rows_of_one_ranking_are_both_quarantined(tmp_path, other_caption):
    """One ranking_id, the other image preferred (same pair, or another caption): neither row is kept,
    even when they sit in different files; an exact repeat of one of them stays a duplicate_row."""
    rows = [good_row(i) for i in range(4)]
    flipped = flipped_label(rows[1])
    if other_caption:
        flipped["caption"] = "another caption"
    _write(tmp_path / "src" / "a.parquet", [*rows, dict(rows[1])])
    _write(tmp_path / "src" / "b.parquet", [flipped, good_row(7)])
    counts, out = _run(tmp_path, tmp_path / "src")
    assert counts["quarantine_by_reason"] == {"conflicting_duplicate": 2, "duplicate_row": 1}
    assert counts["kept_rows"] == 4  # rows 0, 2, 3 and 7
    quarantine = {
        (r["source_file"].rsplit("/", 1)[1], r["source_row"]): r for r in _quarantine(out).to_pylist()
    }
    assert {k: r["reason"] for k, r in quarantine.items()} == {
        ("a.parquet", 1): "conflicting_duplicate",
        ("a.parquet", 4): "duplicate_row",
        ("b.parquet", 0): "conflicting_duplicate",
    }
    assert "ranking_id 10001" in quarantine[("b.parquet", 0)]["detail"]
    assert 10_001 not in _pairs(out).column("ranking_id").to_pylist()


def test_agreeing_rows_of_one_ranking_are_not_conflicts(tmp_path):
    """Same ranking, same preferred image, another caption: both kept, as before; a tie contradicts nothing."""
    first = good_row(0)
    recaptioned = {**good_row(0), "caption": "another caption"}
    tie = {**good_row(0), "label_0": 0.5, "label_1": 0.5, "caption": "a third caption"}
    _write(tmp_path / "src" / "a.parquet", [first, recaptioned, tie])
    counts, _ = _run(tmp_path, tmp_path / "src")
    assert counts["kept_rows"] == 2 and counts["quarantine_by_reason"] == {"tie": 1}


# ---------------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("winner", [0, 1])
def test_winner_is_the_best_image_side(tmp_path, winner):
    row = good_row(3, winner=winner)
    row["model_0"], row["model_1"] = "model-zero", "model-one"
    _write(tmp_path / "src" / "one.parquet", [row])
    _, out = _run(tmp_path, tmp_path / "src")
    [pair] = _pairs(out).to_pylist()
    assert pair["winner_uid"] == uid(3, winner) == row["best_image_uid"]
    assert pair["loser_uid"] == uid(3, 1 - winner)
    assert (pair["winner_model"], pair["loser_model"]) == (
        ("model-zero", "model-one"),
        ("model-one", "model-zero"),
    )[winner]
    assert (pair["user_id"], pair["ranking_id"], pair["caption"]) == (
        row["user_id"],
        row["ranking_id"],
        row["caption"],
    )
    assert len(pair["pair_id"]) == 20


def test_pairs_are_partitioned_by_creation_date(tmp_path):
    rows = [good_row(i, day=d) for i, d in enumerate([0, 0, 1, 4, 4, 4])]
    _write(tmp_path / "src" / "days.parquet", rows)
    counts, out = _run(tmp_path, tmp_path / "src")
    assert counts["partitions"] == {"2023-05-01": 2, "2023-05-02": 1, "2023-05-05": 3}
    assert sorted(p.name for p in (out / "pairs").iterdir()) == [
        "created_date=2023-05-01",
        "created_date=2023-05-02",
        "created_date=2023-05-05",
    ]
    part = pq.read_table(out / "pairs" / "created_date=2023-05-05" / "part-00000.parquet")
    assert part.schema == PAIRS
    assert {t.date() for t in part.column("created_at").to_pylist()} == {dt.date(2023, 5, 5)}


def test_pair_files_rotate_at_rows_per_file(tmp_path):
    _write(tmp_path / "src" / "many.parquet", [good_row(i, day=0) for i in range(7)])
    _, out = _run(tmp_path, tmp_path / "src", CFG.model_copy(update={"pairs_rows_per_file": 3}))
    files = sorted((out / "pairs" / "created_date=2023-05-01").iterdir())
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3, 1]


def test_pair_ids_are_stable_across_runs(tmp_path):
    _write(tmp_path / "src" / "a.parquet", [good_row(i) for i in range(5)])
    first = ingest(CFG, resolve_source(str(tmp_path / "src")), tmp_path / "one")
    second = ingest(CFG, resolve_source(str(tmp_path / "src")), tmp_path / "two")
    assert first == second
    for rel in (
        "pairs/created_date=2023-05-02/part-00000.parquet",
        "quarantine/part-00000.parquet",
        "images/images-000000.tar",
    ):
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()


# ---------------------------------------------------------------------------------------- images


def test_images_are_deduplicated_and_read_back_identical(tmp_path):
    quirks = quirk_file_rows()
    _write(tmp_path / "src" / "quirks.parquet", quirks.rows)
    counts, out = _run(tmp_path, tmp_path / "src")
    shared = uid(0, 0)  # image_0 of good rows 0, 1 and 2
    store = ImageStore(out / "images")
    assert store.uids.count(shared) == 1
    pairs = _pairs(out).to_pylist()
    referenced = {p["winner_uid"] for p in pairs} | {p["loser_uid"] for p in pairs}
    assert set(store.uids) == referenced  # images of kept rows only, every one of them
    assert counts["images_written"] == len(referenced)
    by_uid = {}
    for row in quirks.rows:
        by_uid.setdefault(row["image_0_uid"], row["jpg_0"])
        by_uid.setdefault(row["image_1_uid"], row["jpg_1"])
    for u in referenced:
        assert store.get_bytes(u) == by_uid[u]


def test_sizes_json_matches_the_shards(tmp_path):
    _write(tmp_path / "src" / "a.parquet", [good_row(i) for i in range(9)])
    counts, out = _run(tmp_path, tmp_path / "src", CFG.model_copy(update={"shard_max_images": 5}))
    sizes = json.loads((out / "images" / "sizes.json").read_text())
    assert list(sizes) == [f"images-{i:06d}.tar" for i in range(4)] and counts["image_shards"] == 4
    urls = [str(out / "images" / name) for name in sizes]
    found: dict[str, int] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        name = Path(sample["__url__"]).name
        found[name] = found.get(name, 0) + 1
    assert found == sizes and sum(sizes.values()) == counts["images_written"] == 18


def test_metadata_only_input_ingests_pairs_without_images(tmp_path):
    quirks = quirk_file_rows()
    _write(tmp_path / "src" / "meta.parquet", metadata_only(quirks.rows), images=False)
    counts, out = _run(tmp_path, tmp_path / "src")
    assert counts["has_images"] is False and counts["images_written"] == 0
    assert not (out / "images").exists()
    # without bytes the image reasons cannot apply: those rows are kept
    image_reasons = {
        "empty_image",
        "undecodable_image",
        "unsupported_format",
        "decompression_bomb",
        "image_too_large",
    }
    assert not image_reasons & set(counts["quarantine_by_reason"])
    assert counts["kept_rows"] == _pairs(out).num_rows > quirks.reasons.count("")


def test_images_none_ignores_image_bytes(tmp_path):
    _write(tmp_path / "src" / "a.parquet", [good_row(i) for i in range(3)])
    counts, out = _run(tmp_path, tmp_path / "src", CFG.model_copy(update={"images": "none"}))
    assert counts["kept_rows"] == 3 and not (out / "images").exists()


def test_quarantine_is_written_even_when_empty(tmp_path):
    _write(tmp_path / "src" / "a.parquet", [good_row(0)])
    counts, out = _run(tmp_path, tmp_path / "src")
    assert counts["quarantined"] == 0 and _quarantine(out).num_rows == 0


# ---------------------------------------------------------------------------------------- sources


def test_ingest_from_a_memory_url(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.mkdir("/ppd-ingest-test")
    with fs.open("/ppd-ingest-test/train-0.parquet", "wb") as f:
        pq.write_table(to_table([good_row(i) for i in range(4)]), f)
    files = resolve_source("memory://ppd-ingest-test")
    assert [f.url for f in files] == ["memory:///ppd-ingest-test/train-0.parquet"]
    counts = ingest(CFG, files, tmp_path / "out")
    assert counts["kept_rows"] == 4 and counts["images_written"] == 8
    assert list(counts["per_file"]) == ["memory:///ppd-ingest-test/train-0.parquet"]
    fs.rm("/ppd-ingest-test", recursive=True)


def test_resolve_source_forms(tmp_path):
    for rel in (
        "b/2.parquet",
        "a/1.parquet",
        "a/deeper/3.parquet",
        "a/readme.txt",
        ".cache/x.parquet",
        "_tmp/y.parquet",
    ):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 5)
    names = lambda files: [str(Path(f.url).relative_to(tmp_path)) for f in files]  # noqa: E731
    assert names(resolve_source(str(tmp_path))) == ["a/1.parquet", "a/deeper/3.parquet", "b/2.parquet"]
    assert names(resolve_source(str(tmp_path / "a" / "*.parquet"))) == ["a/1.parquet"]
    assert names(resolve_source(str(tmp_path / "b" / "2.parquet"))) == ["b/2.parquet"]
    assert names(resolve_source(f"file://{tmp_path}/b")) == ["b/2.parquet"]
    [f] = resolve_source(str(tmp_path / "b" / "2.parquet"))
    assert f.size == 5 and f.version and f.version.startswith("mtime:")


@pytest.mark.parametrize("sub", ["missing-dir", "empty-dir", "empty-dir/*.parquet"])
def test_resolve_source_without_files_names_the_source(tmp_path, sub):
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(InputError, match=str(tmp_path / sub).replace("*", r"\*")):
        resolve_source(str(tmp_path / sub))


def test_source_identity_follows_content(tmp_path):
    path = _write(tmp_path / "src" / "a.parquet", [good_row(0)])
    before = source_identity(resolve_source(str(tmp_path / "src")))
    json.dumps(before)  # JSON-able
    _write(path, [good_row(0), good_row(1)])
    after = source_identity(resolve_source(str(tmp_path / "src")))
    assert before != after and before["files"][0][0] == after["files"][0][0] == str(path)


def test_progress_is_reported_after_every_batch(tmp_path):
    _write(tmp_path / "src" / "a.parquet", [good_row(i) for i in range(20)])
    _write(tmp_path / "src" / "b.parquet", [good_row(100 + i) for i in range(5)])
    calls = []
    _run(tmp_path, tmp_path / "src", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(8, 25), (16, 25), (20, 25), (25, 25)]


def test_pickapic_schema_constant_is_what_the_factory_writes(tmp_path):
    assert to_table([good_row(0)]).schema == PICKAPIC_V2

"""Image checks, webdataset shard writing and random access by uid (ppd_core.data.images)."""

from __future__ import annotations

import json
import tarfile
import warnings

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import ImageFile

from ppd_core.config import IngestConfig
from ppd_core.data.images import (
    INDEX_NAME,
    SIZES_NAME,
    DigestSet,
    ImageCheck,
    ImageShardWriter,
    ImageStore,
    _ustar_header,
    check_image,
)
from tests.data.pickapic_factory import image_bytes, png_header_only, truncated

CFG = IngestConfig()
FULL = IngestConfig(image_check="full")


def _written(directory, images: dict[str, bytes], max_images: int) -> dict:
    with ImageShardWriter(directory, max_images) as writer:
        for uid, data in images.items():
            assert writer.add(uid, data, check_image(data, CFG))
    return json.loads((directory / SIZES_NAME).read_text())


# ------------------------------------------------------------------------------------------ checks


@pytest.mark.parametrize(
    ("data", "cfg", "reason"),
    [
        (None, CFG, "empty_image"),
        (b"", CFG, "empty_image"),
        (b"this is not an image at all", CFG, "undecodable_image"),
        (truncated(image_bytes(1, size=48)), CFG, "undecodable_image"),
        (truncated(image_bytes(1, size=48, fmt="PNG")), CFG, "undecodable_image"),
        (image_bytes(1, fmt="GIF"), CFG, "unsupported_format"),
        (image_bytes(1, fmt="BMP"), CFG, "unsupported_format"),
        (image_bytes(1, fmt="PNG"), IngestConfig(formats=("JPEG",)), "unsupported_format"),
        (png_header_only(100_000, 100_000), CFG, "decompression_bomb"),  # PIL's own error
        (png_header_only(7_000, 7_000), CFG, "decompression_bomb"),  # over max_image_pixels only
        (image_bytes(1, size=128, fmt="PNG"), IngestConfig(max_image_bytes=10_000), "image_too_large"),
    ],
    ids=[
        "none",
        "zero-bytes",
        "garbage",
        "truncated-jpeg",
        "truncated-png",
        "gif",
        "bmp",
        "png-not-accepted",
        "bomb-pil-error",
        "bomb-over-config",
        "too-many-bytes",
    ],
)
def test_check_image_rejects_with_reason(data, cfg, reason):
    check = check_image(data, cfg)
    assert not check.ok
    assert check.reason == reason, check


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_good_images_pass_with_format_and_size(fmt):
    check = check_image(image_bytes(4, size=24, fmt=fmt), CFG)
    assert check == ImageCheck(True, "", "", fmt, 24, 24)


def test_header_check_decodes_no_pixels(monkeypatch):
    calls = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self) or None)
    assert check_image(image_bytes(2, size=32), CFG).ok
    truncated_jpeg = check_image(truncated(image_bytes(2, size=48)), CFG)
    assert truncated_jpeg.reason == "undecodable_image" and "FFD9" in truncated_jpeg.detail
    assert calls == []  # both verdicts came from the header and the end marker alone
    check_image(image_bytes(2, size=32), FULL)
    assert len(calls) == 1  # full mode does decode


def test_full_check_catches_what_the_header_cannot():
    png = image_bytes(3, size=64, fmt="PNG")
    gutted = png[: len(png) // 2] + png[-12:]  # pixel data cut, IEND chunk kept
    assert check_image(gutted, CFG).ok
    full = check_image(gutted, FULL)
    assert full.reason == "undecodable_image" and "truncated" in full.detail


def test_bomb_is_reported_even_when_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns above ~89M pixels; that must not escape as an exception
        check = check_image(png_header_only(10_000, 10_000), IngestConfig(max_image_pixels=200_000_000))
    assert check.reason == "decompression_bomb"


def test_check_image_never_raises_on_damaged_bytes():
    rng = np.random.default_rng(0)
    sources = [image_bytes(5, size=32, fmt=f) for f in ("JPEG", "PNG", "WEBP")]
    for data in sources:
        for _ in range(40):
            damaged = bytearray(data)
            for pos in rng.integers(0, len(damaged), 6):
                damaged[pos] = int(rng.integers(0, 256))
            cut = int(rng.integers(1, len(damaged) + 1))
            for cfg in (CFG, FULL):
                assert isinstance(check_image(bytes(damaged[:cut]), cfg), ImageCheck)


# ------------------------------------------------------------------------------------------ dedupe


def test_digest_set_behaves_like_a_set_across_merges():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**64, 5000, dtype=np.uint64).tolist()
    digests, reference = DigestSet(merge_at=300), set()
    for start in range(0, len(values), 450):
        batch = values[start : start + 450] + values[max(0, start - 200) : start]  # repeats earlier values
        expected = []
        for v in batch:
            expected.append(v not in reference)
            reference.add(v)
        assert digests.add_many(batch).tolist() == expected
    assert len(digests) == len(reference)
    probes = values[:50] + rng.integers(0, 2**64, 50, dtype=np.uint64).tolist()
    assert digests.contains_many(probes).tolist() == [p in reference for p in probes]
    assert all((p in digests) == (p in reference) for p in probes)


# ------------------------------------------------------------------------------------------ shards


def test_ustar_header_matches_tarfile():
    for name, size in [
        ("0000000a-0000-4000-8000-000000000000.jpg", 1234),
        ("k.json", 0),
        ("k.png", 8**11 - 1),
    ]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
        assert _ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_sizes_index_and_shards_agree(tmp_path):
    images = {f"uid-{i}": image_bytes(i, size=16 + i) for i in range(7)}
    sizes = _written(tmp_path, images, max_images=3)
    assert sizes == {"images-000000.tar": 3, "images-000001.tar": 3, "images-000002.tar": 1}
    urls = [str(tmp_path / name) for name in sorted(sizes)]
    per_shard: dict[str, int] = {}
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        shard = sample["__url__"].rsplit("/", 1)[1]
        per_shard[shard] = per_shard.get(shard, 0) + 1
        meta = json.loads(sample["json"])
        seen[meta["uid"]] = sample["jpg"]
        assert sample["__key__"] == meta["uid"] and meta["format"] == "JPEG"
    assert per_shard == sizes
    assert seen == images
    # the index's offsets are where tarfile finds each image member's data
    index = {row["image_uid"]: row for row in ImageStore(tmp_path).index.to_pylist()}
    found = 0
    for name in sizes:
        with tarfile.open(tmp_path / name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    row = index[member.name.removesuffix(".jpg")]
                    assert (row["shard"], row["offset"], row["nbytes"]) == (
                        name,
                        member.offset_data,
                        member.size,
                    )
                    found += 1
    assert found == len(images)


def test_store_reads_back_byte_identical(tmp_path):
    images = {f"uid-{i}": image_bytes(10 + i, size=20) for i in range(5)}
    _written(tmp_path, images, max_images=2)
    store = ImageStore(tmp_path)
    assert (
        sorted(store.uids) == sorted(images) and len(store) == 5 and "uid-3" in store and "nope" not in store
    )
    for uid, data in images.items():
        assert store.get_bytes(uid) == data
    assert store.get_pil("uid-0").size == (20, 20)
    arr = store.get_array(["uid-1", "uid-4"])
    assert arr.shape == (2, 20, 20, 3) and arr.dtype == np.uint8
    with pytest.raises(KeyError, match="nope"):
        store.get_bytes("nope")


def test_union_store_reads_every_directory_and_the_first_copy_of_a_shared_uid(tmp_path):
    days = [
        {"a": image_bytes(1, size=20), "b": image_bytes(2, size=20), "c": image_bytes(3, size=20)},
        {"d": image_bytes(4, size=20), "b": image_bytes(2, size=20)},  # "b" again (image reuse across days)
        {"e": image_bytes(5, size=20)},
    ]
    for i, images in enumerate(days):
        _written(tmp_path / f"day{i}", images, max_images=2)  # shards of the same names in every day
    union = ImageStore.union([tmp_path / f"day{i}" for i in range(3)])
    assert union.uids == ["a", "b", "c", "d", "e"] and len(union) == 5 and union.index.num_rows == 5
    for images in days:
        for uid, data in images.items():
            assert union.get_bytes(uid) == data
    assert len(union.shard_urls) == 4 and len(set(union.shard_urls)) == 4
    single = ImageStore.union([tmp_path / "day0"])
    assert single.uids == ImageStore(tmp_path / "day0").uids


def test_get_array_needs_a_size_for_mixed_sizes(tmp_path):
    _written(tmp_path, {"a": image_bytes(1, size=16), "b": image_bytes(2, size=24)}, max_images=10)
    store = ImageStore(tmp_path)
    with pytest.raises(ValueError, match="different sizes"):
        store.get_array(["a", "b"])
    assert store.get_array(["a", "b"], size=8).shape == (2, 8, 8, 3)


def test_writer_writes_each_uid_once(tmp_path):
    data = image_bytes(1)
    with ImageShardWriter(tmp_path, 10) as writer:
        assert writer.add("same", data, check_image(data, CFG))
        assert not writer.add("same", data, check_image(data, CFG))
        assert "same" in writer and "other" not in writer
    assert json.loads((tmp_path / SIZES_NAME).read_text()) == {"images-000000.tar": 1}
    with tarfile.open(tmp_path / "images-000000.tar") as tar:
        assert tar.getnames() == ["same.jpg", "same.json"]


def test_writer_refuses_a_failed_image(tmp_path):
    with ImageShardWriter(tmp_path, 10) as writer, pytest.raises(ValueError, match="failed its check"):
        writer.add("x", b"junk", check_image(b"junk", CFG))


def test_uids_that_are_not_safe_keys_are_hashed(tmp_path):
    uid = "dir/name.with.dots"
    data = image_bytes(7, fmt="PNG")
    _written(tmp_path, {uid: data}, max_images=10)
    [sample] = list(
        wds.WebDataset([str(tmp_path / "images-000000.tar")], shardshuffle=False, empty_check=False)
    )
    assert "/" not in sample["__key__"] and "." not in sample["__key__"]
    assert json.loads(sample["json"])["uid"] == uid and sample["png"] == data
    assert ImageStore(tmp_path).get_bytes(uid) == data


def test_shards_are_deterministic(tmp_path):
    images = {f"u{i}": image_bytes(i) for i in range(4)}
    for name in ("a", "b"):
        _written(tmp_path / name, images, max_images=3)
    for f in ("images-000000.tar", "images-000001.tar", SIZES_NAME, INDEX_NAME):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_empty_writer_leaves_an_empty_index(tmp_path):
    ImageShardWriter(tmp_path, 10).close()
    assert json.loads((tmp_path / SIZES_NAME).read_text()) == {}
    assert len(ImageStore(tmp_path)) == 0


def test_store_reads_from_an_fsspec_url(tmp_path):
    images = {"m1": image_bytes(1), "m2": image_bytes(2)}
    _written(tmp_path, images, max_images=1)
    fs = fsspec.filesystem("memory")
    for p in tmp_path.iterdir():
        fs.pipe(f"/store-test/{p.name}", p.read_bytes())
    store = ImageStore("memory://store-test")
    assert store.get_bytes("m2") == images["m2"]
    assert store.shard_urls == [
        "memory:///store-test/images-000000.tar",
        "memory:///store-test/images-000001.tar",
    ]

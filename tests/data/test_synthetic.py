"""The synthetic preference world: schema, determinism, quirks, and that pairs carry the users' tastes."""

from __future__ import annotations

import colorsys
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppd_core.config import QuirkRates, WorldConfig
from ppd_core.data.synthetic import (
    ATTRIBUTES,
    CAPTIONS,
    SyntheticWorld,
    choose_archetypes,
    decode_jpeg,
    encode_jpeg,
    measure_attributes,
    render_images,
    synthesize,
)
from ppd_core.data.world_render import COLOURS, caption_content
from ppd_core.schemas import PICKAPIC_V2, WORLD_USERS

QUIRKY = QuirkRates(
    tie=0.06, unlabeled=0.05, identical=0.04, missing_caption=0.04, duplicate=0.03, bad_image=0.04
)
SMALL = WorldConfig(
    seed=3, num_users=24, mean_pairs_per_user=30, quirks=QUIRKY, rows_per_file=300, row_group_rows=100
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, synthesize(SMALL, out)


def _rows(out: Path) -> list[dict]:
    files = sorted((out / "data").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def _dedup(rows: list[dict]) -> tuple[list[dict], int]:
    """Rows without exact repeats, and how many repeats there were."""
    seen, unique = set(), []
    for row in rows:
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique, len(rows) - len(unique)


def _decodes(data: bytes) -> bool:
    """A complete, decodable JPEG (the end-marker check holds even if PIL is told to load truncated files)."""
    if not data.endswith(b"\xff\xd9"):
        return False
    try:
        decode_jpeg(data)
    except Exception:
        return False
    return True


def _clean(rows: list[dict]) -> list[dict]:
    """Labelled, distinct, captioned rows with two good images and a strict preference."""
    return [
        r
        for r in rows
        if r["has_label"]
        and r["are_different"]
        and r["label_0"] in (0.0, 1.0)
        and r["caption"]
        and _decodes(r["jpg_0"])
        and _decodes(r["jpg_1"])
    ]


# ------------------------------------------------------------------------------------- files and schema


def test_written_files_have_the_pickapic_v2_schema(world):
    out, counts = world
    files = sorted((out / "data").glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(counts["files"])]
    assert counts["files"] >= 2
    for i, f in enumerate(files):
        schema = pq.read_schema(f)
        assert schema.names == PICKAPIC_V2.names
        assert schema.types == PICKAPIC_V2.types
        meta = pq.ParquetFile(f).metadata
        assert all(meta.row_group(g).num_rows <= SMALL.row_group_rows for g in range(meta.num_row_groups))
        if i < len(files) - 1:
            assert meta.num_rows == SMALL.rows_per_file
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == counts["rows"]
    assert pq.read_schema(out / "world" / "users.parquet").equals(WORLD_USERS)


def test_same_config_gives_byte_identical_files(tmp_path):
    cfg = WorldConfig(seed=5, num_users=6, mean_pairs_per_user=12, quirks=QUIRKY, rows_per_file=40)
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert synthesize(cfg, first) == synthesize(cfg, second)
    synthesize(cfg.model_copy(update={"seed": 6}), other)
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(names) >= 4
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "data/part-00000.parquet").read_bytes() != (
        other / "data/part-00000.parquet"
    ).read_bytes()


def test_world_json_and_users_round_trip(world):
    out, counts = world
    meta = json.loads((out / "world" / "world.json").read_text())
    assert meta["attributes"] == list(ATTRIBUTES)
    assert meta["captions"] == list(CAPTIONS)
    assert meta["image_size"] == SMALL.image_size
    assert WorldConfig.model_validate(meta["config"]) == SMALL
    assert np.array(meta["archetypes"]).shape == (SMALL.num_archetypes, len(ATTRIBUTES))
    assert all(s > 0 for s in meta["attribute_std"])

    loaded = SyntheticWorld.load(out)
    assert len(loaded.user_ids) == counts["users"] == SMALL.num_users
    assert {r["user_id"] for r in _rows(out)} == set(loaded.user_ids)
    assert all(100_000 <= u < 10_000_000 for u in loaded.user_ids)
    for u in loaded.user_ids:
        pref = loaded.true_preference(u)
        assert pref.dtype == np.float32 and pref.shape == (len(ATTRIBUTES),)
        assert np.linalg.norm(pref) == pytest.approx(1.0, abs=1e-5)
        assert 0 <= loaded.archetype(u) < SMALL.num_archetypes
    with pytest.raises(KeyError):
        loaded.true_preference(1)


# ------------------------------------------------------------------------------------------- quirks


def test_quirk_counts_match_the_files_and_the_rates(world):
    out, counts = world
    unique, repeats = _dedup(_rows(out))
    n = len(unique)
    quirks = counts["quirks"]
    assert repeats == quirks["duplicate"] == round(QUIRKY.duplicate * n)

    found = {
        "tie": sum(r["label_0"] == r["label_1"] == 0.5 for r in unique),
        "unlabeled": sum(not r["has_label"] for r in unique),
        "identical": sum(not r["are_different"] for r in unique),
        "missing_caption": sum(not r["caption"] for r in unique),
        "bad_image": sum(not (_decodes(r["jpg_0"]) and _decodes(r["jpg_1"])) for r in unique),
    }
    for name, count in found.items():
        assert count == quirks[name] == round(getattr(QUIRKY, name) * n), name

    missing = [r["caption"] for r in unique if not r["caption"]]
    assert None in missing and "" in missing
    bad = [b for r in unique for b in (r["jpg_0"], r["jpg_1"]) if not _decodes(b)]
    assert b"" in bad and any(len(b) > 0 for b in bad)
    for r in unique:
        if not r["are_different"]:
            assert r["jpg_0"] == r["jpg_1"] and r["image_0_uid"] != r["image_1_uid"]
        if not r["has_label"]:
            assert r["label_0"] == r["label_1"] == 0.0 and r["best_image_uid"] == ""
        if r["label_0"] == 0.5:
            assert r["best_image_uid"] == r["image_0_uid"]


def test_reused_images_keep_their_bytes_and_caption(world):
    out, counts = world
    unique, _ = _dedup(_rows(out))
    first_bytes: dict[str, bytes] = {}
    contents: dict[str, set] = {}
    reused = 0
    for r in unique:
        reused += r["image_0_uid"] in first_bytes
        for side in ("0", "1"):
            uid, data = r[f"image_{side}_uid"], r[f"jpg_{side}"]
            assert first_bytes.setdefault(uid, data) == data  # a uid never has two byte strings
            if r["caption"]:
                contents.setdefault(uid, set()).add(caption_content(r["caption"]))
    assert all(len(c) == 1 for c in contents.values())  # reuse stays within the caption
    assert reused == counts["quirks"]["image_reuse"]
    assert 0.4 * SMALL.image_reuse * len(unique) <= reused <= 1.2 * SMALL.image_reuse * len(unique)
    assert counts["unique_images"] == len(first_bytes)


def test_zero_quirk_rates_give_a_clean_file(tmp_path):
    cfg = WorldConfig(
        seed=1,
        num_users=8,
        mean_pairs_per_user=15,
        quirks=QuirkRates(**dict.fromkeys(QUIRKY.model_fields, 0.0)),
    )
    counts = synthesize(cfg, tmp_path)
    rows = _rows(tmp_path)
    assert all(v == 0 for k, v in counts["quirks"].items() if k != "image_reuse")
    assert _dedup(rows)[1] == 0
    assert len({r["ranking_id"] for r in rows}) == len(rows)
    assert _clean(rows) == rows
    for r in rows:
        assert r["label_1"] == 1.0 - r["label_0"]
        assert r["best_image_uid"] == (r["image_0_uid"] if r["label_0"] == 1.0 else r["image_1_uid"])
        assert r["image_0_url"].endswith(r["image_0_uid"] + ".jpg") and r["image_0_url"].startswith(
            "https://"
        )
        assert r["num_example_per_prompt"] in (1, 2)
    assert [r["__index_level_0__"] for r in rows] == list(range(len(rows)))


# --------------------------------------------------------------------------------- users and dates


def test_rows_per_user_are_long_tailed(world):
    out, _ = world
    users, per_user = np.unique([r["user_id"] for r in _rows(out)], return_counts=True)
    assert len(per_user) == SMALL.num_users
    assert per_user.min() >= SMALL.min_rows_per_user and per_user.max() <= SMALL.max_rows_per_user
    assert per_user.max() >= 3 * np.median(per_user)


def test_rows_are_sorted_and_spread_over_the_configured_days(world):
    out, _ = world
    rows = _rows(out)
    times = np.array([r["created_at"] for r in rows], dtype="datetime64[ns]")
    assert (np.diff(times) >= np.timedelta64(0, "ns")).all()
    start = np.datetime64(SMALL.start_date, "ns")
    end = np.datetime64(SMALL.start_date + dt.timedelta(days=SMALL.days), "ns")
    assert times.min() >= start and times.max() < end
    assert (times.max() - times.min()) >= np.timedelta64(int(0.8 * SMALL.days), "D")
    unique, _ = _dedup(rows)
    ranking = [r["ranking_id"] for r in unique]
    assert len(set(ranking)) == len(ranking) and ranking == sorted(ranking)


# ---------------------------------------------------------------------------------- pixels and truth


def test_measured_attributes_track_the_style_latents():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((400, len(ATTRIBUTES)))
    captions = [CAPTIONS[i] for i in rng.integers(len(CAPTIONS), size=400)]
    images = np.stack([decode_jpeg(encode_jpeg(img)) for img in render_images(captions, latents)])
    assert images.shape == (400, 16, 16, 3) and images.dtype == np.uint8
    corr = np.corrcoef(measure_attributes(images).T, latents.T)[: len(ATTRIBUTES), len(ATTRIBUTES) :]
    for i, name in enumerate(ATTRIBUTES):
        assert corr[i, i] > 0.8, name
        assert np.abs(np.delete(corr[i], i)).max() < 0.3, name  # each measure reads one attribute


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((16, 16, 3), np.uint8),
        np.full((16, 16, 3), 255, np.uint8),
        np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.full((7, 33, 3), 90, np.uint8),
        np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8),
    ],
    ids=["black", "white", "noise", "1px", "flat-7x33", "noise-64x48"],
)
def test_measure_attributes_is_finite_on_any_image(image):
    values = measure_attributes(np.stack([image, image]))
    assert values.shape == (2, len(ATTRIBUTES)) and values.dtype == np.float64
    assert np.isfinite(values).all()
    if image.min() == image.max():  # a blank image has no object: centred, empty, unsaturated
        assert values[0, ATTRIBUTES.index("size")] == 0.0
        assert values[0, ATTRIBUTES.index("position")] == 0.5


def test_objects_keep_the_caption_colour_whatever_the_style():
    rng = np.random.default_rng(2)
    captions = list(CAPTIONS) * 4
    images = render_images(captions, rng.uniform(-3, 3, (len(captions), len(ATTRIBUTES))))
    for caption, img in zip(captions, images, strict=True):
        colour, _ = caption_content(caption)
        centre = img[6:10, 6:10].reshape(-1, 3).astype(float)
        background = img[0, 0].astype(float)
        obj = centre[np.argmax(np.linalg.norm(centre - background, axis=1))] / 255  # most object-like pixel
        hue = colorsys.rgb_to_hsv(*obj)[0]
        want = colorsys.rgb_to_hsv(*COLOURS[colour])[0]
        assert min(abs(hue - want), 1 - abs(hue - want)) < 0.06, caption


def test_archetypes_are_well_separated():
    for count in (2, 4, 6, 8):
        arch = choose_archetypes(count, np.random.default_rng(0))
        assert arch.shape == (count, len(ATTRIBUTES))
        assert np.allclose(np.linalg.norm(arch, axis=1), 1.0)
        assert ((np.abs(arch) > 0).sum(axis=1) == 2).all()
        cos = arch @ arch.T
        assert cos[np.triu_indices(count, 1)].max() <= 1e-9  # no two archetypes share a taste


def test_users_of_different_archetypes_have_separated_preferences(world):
    loaded = SyntheticWorld.load(world[0])
    prefs = np.stack([loaded.true_preference(u) for u in loaded.user_ids])
    archetype = np.array([loaded.archetype(u) for u in loaded.user_ids])
    cos = prefs @ prefs.T
    same = (archetype[:, None] == archetype[None, :]) & ~np.eye(len(prefs), dtype=bool)
    different = archetype[:, None] != archetype[None, :]
    assert cos[same].mean() > 0.4
    assert cos[different].mean() < 0.1
    assert cos[same].mean() - cos[different].mean() > 0.5
    assert (np.argmax(prefs @ loaded.archetypes.T, axis=1) == archetype).mean() >= 0.8


def test_labels_follow_the_oracle_reward(world):
    out, _ = world
    loaded = SyntheticWorld.load(out)
    gaps, agree = [], []
    for r in _clean(_dedup(_rows(out))[0]):
        r0, r1 = loaded.reward(r["user_id"], np.stack([decode_jpeg(r["jpg_0"]), decode_jpeg(r["jpg_1"])]))
        gaps.append(abs(r0 - r1))
        agree.append((r0 > r1) == (r["label_0"] == 1.0))
    gaps, agree = np.array(gaps), np.array(agree)
    clear = gaps >= 1.0
    assert clear.mean() > 0.3  # pairs carry information
    assert agree[clear].mean() >= 0.85
    assert 0.6 < agree.mean() < 0.99  # Bradley-Terry noise: not a deterministic rule


def test_pairs_differ_clearly_in_one_or_two_attributes(world):
    out, _ = world
    loaded = SyntheticWorld.load(out)
    rows = _clean(_dedup(_rows(out))[0])
    z0 = loaded.attributes(np.stack([decode_jpeg(r["jpg_0"]) for r in rows]))
    z1 = loaded.attributes(np.stack([decode_jpeg(r["jpg_1"]) for r in rows]))
    changed = (np.abs(z1 - z0) > 0.75 * SMALL.shift_min).sum(axis=1)
    assert np.isin(changed, (1, 2)).mean() > 0.9


def test_shot_attribute_difference_points_to_the_users_preference(world):
    out, _ = world
    loaded = SyntheticWorld.load(out)
    by_user: dict[int, list[dict]] = {}
    for r in _clean(_dedup(_rows(out))[0]):
        by_user.setdefault(r["user_id"], []).append(r)
    cosines = []
    for user, rows in by_user.items():
        for start in range(0, len(rows) - 3, 4):
            shots = rows[start : start + 4]
            first = [decode_jpeg(r["jpg_0"]) for r in shots]
            second = [decode_jpeg(r["jpg_1"]) for r in shots]
            winners = np.stack(
                [a if r["label_0"] == 1.0 else b for a, b, r in zip(first, second, shots, strict=True)]
            )
            losers = np.stack(
                [b if r["label_0"] == 1.0 else a for a, b, r in zip(first, second, shots, strict=True)]
            )
            diff = loaded.shot_attribute_difference(winners, losers)
            assert diff.shape == (len(ATTRIBUTES),) and diff.dtype == np.float32
            cosines.append(diff @ loaded.true_preference(user) / (np.linalg.norm(diff) + 1e-9))
    cosines = np.array(cosines)
    assert len(cosines) >= 50
    assert cosines.mean() > 0.3 and (cosines > 0).mean() > 0.85


def test_reward_is_the_preference_dot_the_standardised_attributes(world):
    loaded = SyntheticWorld.load(world[0])
    rng = np.random.default_rng(4)
    images = render_images([CAPTIONS[0]] * 8, rng.standard_normal((8, len(ATTRIBUTES))))
    user = loaded.user_ids[0]
    expected = loaded.attributes(images) @ loaded.true_preference(user).astype(np.float64)
    assert np.allclose(loaded.reward(user, images), expected, atol=1e-5)
    # moving an image along the user's preference raises its reward
    pref = loaded.true_preference(user)
    base = np.zeros((1, len(ATTRIBUTES)))
    better = render_images([CAPTIONS[0]], base + 2.0 * pref)
    worse = render_images([CAPTIONS[0]], base - 2.0 * pref)
    assert loaded.reward(user, better)[0] > loaded.reward(user, worse)[0] + 2.0

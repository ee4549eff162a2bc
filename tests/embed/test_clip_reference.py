"""The CLIP-difference embedder on the tiny open_clip default, and the synthetic world's reference embedders."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ppd_core.config import EmbedderSpec, QuirkRates, TinyModelsConfig, WorldConfig
from ppd_core.data.synthetic import SyntheticWorld, decode_jpeg, synthesize
from ppd_core.embed.base import Shot, ShotSet
from ppd_core.embed.clip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CLIPDiffEmbedder,
    build_tiny_open_clip,
    resolve_clip_source,
)
from ppd_core.embed.reference import (
    TrueAttributeDiffEmbedder,
    TruePosteriorEmbedder,
    TruePreferenceEmbedder,
    world_digest,
)
from ppd_core.errors import ConfigError
from ppd_core.weights import files_digest

TINY = TinyModelsConfig()
NO_QUIRKS = QuirkRates(tie=0, unlabeled=0, identical=0, missing_caption=0, duplicate=0, bad_image=0)
WORLD = WorldConfig(seed=1, num_users=12, mean_pairs_per_user=24, quirks=NO_QUIRKS)
SHOTS = 4


def shot_sets_from_world(out: Path, shots: int = SHOTS) -> list[ShotSet]:
    """Consecutive disjoint chunks of ``shots`` rows per user, preferred image first."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted((out / "data").glob("part-*.parquet"))])
    by_user: dict[int, list[Shot]] = defaultdict(list)
    for row in table.to_pylist():
        first = row["best_image_uid"] == row["image_0_uid"]
        jpgs = (row["jpg_0"], row["jpg_1"]) if first else (row["jpg_1"], row["jpg_0"])
        preferred, dispreferred = (Image.fromarray(decode_jpeg(b)) for b in jpgs)
        by_user[row["user_id"]].append(Shot(row["caption"], preferred, dispreferred))
    sets = []
    for user_id, user_shots in sorted(by_user.items()):
        for i in range(len(user_shots) // shots):
            chunk = tuple(user_shots[i * shots : (i + 1) * shots])
            sets.append(ShotSet(f"{user_id}-{i}", user_id, chunk))
    return sets


def swapped(shot_set: ShotSet) -> ShotSet:
    shots = tuple(replace(s, preferred=s.dispreferred, dispreferred=s.preferred) for s in shot_set.shots)
    return replace(shot_set, shots=shots)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_open_clip(tmp_path_factory.mktemp("models") / "open_clip", TINY)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(WORLD, out)
    return out


@pytest.fixture(scope="module")
def sets(world_dir) -> list[ShotSet]:
    return shot_sets_from_world(world_dir)


@pytest.fixture(scope="module")
def clip(tiny_dir) -> CLIPDiffEmbedder:
    return CLIPDiffEmbedder.from_spec(EmbedderSpec(name="clip-diff", kind="clip_diff"), tiny_dir)


# ------------------------------------------------------------------------------------ tiny open_clip


def test_tiny_open_clip_layout(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    config = json.loads((tiny_dir / CONFIG_FILE).read_text())
    assert config["model_cfg"]["embed_dim"] == TINY.clip_embed_dim
    assert config["model_cfg"]["vision_cfg"]["image_size"] == TINY.clip_image_size
    assert {"mean", "std"} <= set(config["preprocess_cfg"])


def test_tiny_open_clip_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_open_clip(tmp_path / "again", TINY)
    other = build_tiny_open_clip(tmp_path / "other", TINY.model_copy(update={"seed": 1}))
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert (other / WEIGHTS_FILE).read_bytes() != (tiny_dir / WEIGHTS_FILE).read_bytes()


def test_tiny_open_clip_rebuild_replaces_the_directory(tmp_path):
    first = build_tiny_open_clip(tmp_path / "m", TINY.model_copy(update={"seed": 1}))
    digest = files_digest([first / WEIGHTS_FILE])
    second = build_tiny_open_clip(tmp_path / "m", TINY)
    assert files_digest([second / WEIGHTS_FILE]) != digest
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging leftovers


def test_local_dir_load_is_bit_identical(tiny_dir):
    saved = load_file(tiny_dir / WEIGHTS_FILE)
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tiny_dir))
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    assert model.visual.preprocess_cfg["size"] == (TINY.clip_image_size, TINY.clip_image_size)


# ------------------------------------------------------------------------------------ model specs


@pytest.mark.parametrize(
    ("spec", "model_name", "pretrained", "model_id"),
    [
        (None, "local-dir:{dir}", None, "local-dir:open_clip"),
        ("{dir}", "local-dir:{dir}", None, "local-dir:open_clip"),
        ("local-dir:{dir}", "local-dir:{dir}", None, "local-dir:open_clip"),
        ("ViT-B-32", "ViT-B-32", "openai", "ViT-B-32:openai"),
        ("ViT-B-32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k", "ViT-B-32:laion2b_s34b_b79k"),
        ("hf-hub:org/repo", "hf-hub:org/repo", None, "hf-hub:org/repo"),
    ],
)
def test_resolve_clip_source(tiny_dir, spec, model_name, pretrained, model_id):
    model = None if spec is None else spec.format(dir=tiny_dir)
    source = resolve_clip_source(model, tiny_dir)
    assert source.model_name == model_name.format(dir=tiny_dir.resolve())
    assert source.pretrained == pretrained
    assert source.model_id == model_id
    if model_name.startswith("local-dir:"):
        assert source.weights_digest == files_digest([tiny_dir / WEIGHTS_FILE])
    elif pretrained:
        assert source.weights_digest == pretrained


@pytest.mark.parametrize("spec", ["no-such-model", "no-such-model:openai", "local-dir:/nonexistent/dir"])
def test_resolve_clip_source_refuses(tmp_path, spec):
    with pytest.raises(ConfigError):
        resolve_clip_source(spec, tmp_path)


def test_default_dir_without_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not an open_clip model directory"):
        resolve_clip_source(None, tmp_path)
    with pytest.raises(ConfigError, match="tiny_models"):
        resolve_clip_source(None, None)


# ------------------------------------------------------------------------------------ CLIP difference


def test_clip_diff_shape_and_dtype(clip, sets):
    out = clip.embed(sets[:3]).embeddings
    assert clip.output_shape == (TINY.clip_embed_dim,)
    assert out.shape == (3, TINY.clip_embed_dim)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.all(out.norm(dim=1) > 0)


def test_clip_diff_is_deterministic(clip, tiny_dir, sets):
    again = CLIPDiffEmbedder.from_spec(
        EmbedderSpec(name="c", kind="clip_diff", model=str(tiny_dir)), tiny_dir
    )
    first = clip.embed(sets[:4]).embeddings
    assert torch.equal(first, clip.embed(sets[:4]).embeddings)
    assert torch.equal(first, again.embed(sets[:4]).embeddings)


def test_clip_diff_is_the_difference_of_unit_image_features(clip, tiny_dir, sets):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tiny_dir))
    shot = sets[0].shots[0]
    with torch.no_grad():
        feats = model.eval().encode_image(
            torch.stack([preprocess(shot.preferred), preprocess(shot.dispreferred)])
        )
    feats = feats / feats.norm(dim=-1, keepdim=True)
    got = clip.embed([replace(sets[0], shots=(shot,))]).embeddings[0]
    torch.testing.assert_close(got, feats[0] - feats[1], rtol=0, atol=1e-6)


def test_clip_diff_flips_sign_when_preference_flips(clip, sets):
    out = clip.embed(sets[:4]).embeddings
    flipped = clip.embed([swapped(s) for s in sets[:4]]).embeddings
    torch.testing.assert_close(flipped, -out, rtol=0, atol=1e-6)


def test_clip_diff_is_the_mean_over_shots(clip, sets):
    shot_set = sets[0]
    singles = [replace(shot_set, shots=(s,)) for s in shot_set.shots]
    per_shot = clip.embed(singles).embeddings  # (K, D)
    torch.testing.assert_close(clip.embed([shot_set]).embeddings[0], per_shot.mean(dim=0), rtol=0, atol=1e-6)


def test_clip_diff_batch_equals_one_at_a_time(clip, sets):
    batch = clip.embed(sets[:6]).embeddings
    single = torch.cat([clip.embed([s]).embeddings for s in sets[:6]])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)


def test_clip_identity_follows_the_weights(clip, tiny_dir, tmp_path):
    other_dir = build_tiny_open_clip(tmp_path / "open_clip", TINY.model_copy(update={"seed": 7}))
    other = CLIPDiffEmbedder.from_spec(EmbedderSpec(name="c", kind="clip_diff"), other_dir)
    ident = clip.identity()
    assert ident["kind"] == "clip_diff"
    assert ident["weights_digest"] == files_digest([tiny_dir / WEIGHTS_FILE])
    assert ident["image_size"] == [TINY.clip_image_size, TINY.clip_image_size]
    assert other.identity()["weights_digest"] != ident["weights_digest"]
    assert {k: v for k, v in other.identity().items() if k != "weights_digest"} == {
        k: v for k, v in ident.items() if k != "weights_digest"
    }
    json.dumps(ident)  # JSON-able


# ------------------------------------------------------------------------------------ references


def test_true_preference_is_the_users_vector(world_dir, sets):
    world = SyntheticWorld.load(world_dir)
    embedder = TruePreferenceEmbedder.from_world_dir(world_dir)
    out = embedder.embed(sets).embeddings.numpy()
    expected = np.stack([world.true_preference(s.user_id) for s in sets])
    assert embedder.output_shape == (5,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_true_preference_of_a_user_the_world_did_not_draw_is_its_unit_shot_difference(world_dir, sets):
    """A reward user of the relabel stage has labels, not a preference vector."""
    stranger = [replace(s, user_id=1) for s in sets[:3]]
    out = TruePreferenceEmbedder.from_world_dir(world_dir).embed(stranger).embeddings.numpy()
    diff = TrueAttributeDiffEmbedder.from_world_dir(world_dir).embed(stranger).embeddings.numpy()
    np.testing.assert_allclose(out, diff / np.linalg.norm(diff, axis=1, keepdims=True), rtol=1e-6)


def test_true_attribute_diff_is_the_worlds_shot_difference(world_dir, sets):
    world = SyntheticWorld.load(world_dir)
    out = TrueAttributeDiffEmbedder(world).embed(sets[:5]).embeddings.numpy()
    for row, shot_set in zip(out, sets[:5], strict=True):
        winners = np.stack([np.asarray(s.preferred) for s in shot_set.shots])
        losers = np.stack([np.asarray(s.dispreferred) for s in shot_set.shots])
        np.testing.assert_array_equal(row, world.shot_attribute_difference(winners, losers))


def test_true_attribute_diff_points_towards_the_true_preference(world_dir, sets):
    diff = TrueAttributeDiffEmbedder.from_world_dir(world_dir).embed(sets).embeddings.numpy()
    true = TruePreferenceEmbedder.from_world_dir(world_dir).embed(sets).embeddings.numpy()
    cosine = np.sum(diff * true, axis=1) / np.linalg.norm(diff, axis=1) / np.linalg.norm(true, axis=1)
    assert cosine.mean() > 0.3
    # swapping winner and loser points away from it
    flipped = TrueAttributeDiffEmbedder.from_world_dir(world_dir).embed([swapped(s) for s in sets])
    np.testing.assert_allclose(flipped.embeddings.numpy(), -diff, atol=1e-6)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_true_posterior_reads_the_true_preference_better_than_the_shot_difference(world_dir, sets):
    """The Bayes posterior mean under the world's prior is the best read of K pairs; more pairs read better."""
    posterior = TruePosteriorEmbedder.from_world_dir(world_dir)
    out = posterior.embed(sets).embeddings.numpy()
    true = TruePreferenceEmbedder.from_world_dir(world_dir).embed(sets).embeddings.numpy()
    diff = TrueAttributeDiffEmbedder.from_world_dir(world_dir).embed(sets).embeddings.numpy()
    assert posterior.output_shape == (5,) and out.dtype == np.float32
    assert np.all(np.linalg.norm(out, axis=1) <= 1 + 1e-6)  # a mean of unit vectors
    assert _cosine(out, true).mean() > _cosine(diff, true).mean() + 0.02
    # all of a user's pairs as one set pin the vector down far better than 4 of them
    by_user: dict[int, list] = defaultdict(list)
    for s in sets:
        by_user[s.user_id].extend(s.shots)
    whole = [ShotSet(f"{u}-all", u, tuple(shots)) for u, shots in sorted(by_user.items())]
    whole_out = posterior.embed(whole).embeddings.numpy()
    whole_true = TruePreferenceEmbedder.from_world_dir(world_dir).embed(whole).embeddings.numpy()
    assert _cosine(whole_out, whole_true).mean() > max(0.85, _cosine(out, true).mean() + 0.1)


def test_true_posterior_without_information_is_the_prior_mean(world_dir, sets):
    """Pairs of identical images say nothing: every prior draw keeps its weight."""
    posterior = TruePosteriorEmbedder.from_world_dir(world_dir)
    blank = replace(sets[0], shots=tuple(replace(s, dispreferred=s.preferred) for s in sets[0].shots))
    np.testing.assert_allclose(
        posterior.embed([blank]).embeddings.numpy()[0], posterior.prior.mean(axis=0), atol=1e-6
    )


def test_true_posterior_is_deterministic_and_named(world_dir, sets):
    first = TruePosteriorEmbedder.from_world_dir(world_dir)
    second = TruePosteriorEmbedder(SyntheticWorld.load(world_dir))
    np.testing.assert_array_equal(
        first.embed(sets[:4]).embeddings.numpy(), second.embed(sets[:4]).embeddings.numpy()
    )
    ident = first.identity()
    assert ident == second.identity()
    assert ident["kind"] == "true_posterior" and ident["weights_digest"] == world_digest(world_dir / "world")
    assert ident["prior_samples"] == TruePosteriorEmbedder.PRIOR_SAMPLES


def test_reference_identity_carries_the_world_digest(world_dir, tmp_path):
    digest = world_digest(world_dir / "world")
    from_dir = TruePreferenceEmbedder.from_world_dir(world_dir).identity()
    from_world_subdir = TruePreferenceEmbedder.from_world_dir(world_dir / "world").identity()
    in_memory = TruePreferenceEmbedder(SyntheticWorld.load(world_dir)).identity()
    assert from_dir == from_world_subdir == in_memory
    assert from_dir["weights_digest"] == digest and from_dir["kind"] == "true_preference"
    assert TrueAttributeDiffEmbedder.from_world_dir(world_dir).identity()["kind"] == "true_attribute_diff"

    other = tmp_path / "other"
    synthesize(WORLD.model_copy(update={"seed": 2, "num_users": 4, "mean_pairs_per_user": 5}), other)
    assert TruePreferenceEmbedder.from_world_dir(other).identity()["weights_digest"] != digest

"""Reward models: the tiny offline weights through the real loaders, the world oracle, digests, skips."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel

from ppd_core.config import EvaluateConfig, QuirkRates, RewardSpec, TinyModelsConfig, WorldConfig
from ppd_core.data.synthetic import SyntheticWorld, synthesize
from ppd_core.data.world_render import ATTRIBUTES, CAPTIONS, render_images
from ppd_core.errors import PPDError, RewardError
from ppd_core.rewards.scorers import (
    BATCH_SIZE,
    TINY_DIR,
    TINY_RECORD,
    AestheticMLP,
    RewardUnavailable,
    load_reward,
    load_rewards,
)
from ppd_core.tiny.rewards import build_tiny_rewards
from ppd_core.weights import weight_file_sha256

TINY = TinyModelsConfig()
NO_QUIRKS = QuirkRates(tie=0, unlabeled=0, identical=0, missing_caption=0, duplicate=0, bad_image=0)
WORLD = WorldConfig(seed=1, num_users=4, mean_pairs_per_user=4, quirks=NO_QUIRKS)
MODEL_KINDS = ("pickscore", "clip_score", "hps", "aesthetic")
N = 6


def spec(kind: str, **kw) -> RewardSpec:
    return RewardSpec(name=kw.pop("name", kind), kind=kind, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny_models output dir holding only ``rewards/``."""
    root = tmp_path_factory.mktemp("tiny_models")
    build_tiny_rewards(root / TINY_DIR, TINY)
    return root


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(WORLD, out)
    return out / "world"  # what the evaluate stage passes: the synthesize stage's world/ dir


@pytest.fixture(scope="module")
def world(world_dir) -> SyntheticWorld:
    return SyntheticWorld.load(world_dir.parent)


@pytest.fixture(scope="module")
def rewards(tiny) -> dict:
    return {kind: load_reward(spec(kind), tiny) for kind in MODEL_KINDS}


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, list[str]]:
    """N world images (16 px) with their captions; prompts repeat, as the evaluate stage's do."""
    rng = np.random.default_rng(0)
    captions = [CAPTIONS[i % 3] for i in range(N)]
    return render_images(captions, rng.standard_normal((N, len(ATTRIBUTES)))), captions


def kind_dir(tiny: Path, kind: str) -> Path:
    return tiny / TINY_DIR / kind


def record(tiny: Path, kind: str) -> dict:
    return json.loads((kind_dir(tiny, kind) / TINY_RECORD).read_text())


# ------------------------------------------------------------------------------------ tiny weights


def test_tiny_rewards_use_the_real_on_disk_formats(tiny):
    pick, clip_score = kind_dir(tiny, "pickscore"), kind_dir(tiny, "clip_score")
    for model_dir in (pick / "model", clip_score / "model"):
        assert {"config.json", "model.safetensors"} <= {p.name for p in model_dir.iterdir()}
    for processor_dir in (pick / "processor", clip_score / "model"):
        assert {"processor_config.json", "tokenizer.json", "vocab.json", "merges.txt"} <= {
            p.name for p in processor_dir.iterdir()
        }
    hps = kind_dir(tiny, "hps")
    assert [p.name for p in (hps / "arch").iterdir()] == ["open_clip_config.json"]  # architecture only
    assert set(torch.load(hps / "HPS_tiny_compressed.pt", weights_only=True)) == {"state_dict"}
    aesthetic = kind_dir(tiny, "aesthetic")
    mlp_state = torch.load(aesthetic / "aesthetic-mlp.pth", weights_only=True)
    assert set(mlp_state) == set(AestheticMLP.KEYS)
    assert mlp_state["layers.0.weight"].shape[1] == TINY.clip_embed_dim
    assert (aesthetic / "clip" / "open_clip_model.safetensors").is_file()


def test_tiny_build_is_deterministic_and_records_digests(tiny, tmp_path):
    again = build_tiny_rewards(tmp_path / TINY_DIR, TINY)
    for kind in MODEL_KINDS:
        first, second = record(tiny, kind), json.loads((again / kind / TINY_RECORD).read_text())
        assert first == second
        weights = {"pickscore": "model/model.safetensors", "clip_score": "model/model.safetensors"}
        assert first["sha256"] == weight_file_sha256(kind_dir(tiny, kind) / weights.get(kind, first["model"]))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_reward_scores_are_finite_float64_and_deterministic(rewards, batch, kind):
    images, prompts = batch
    reward = rewards[kind]
    first, second = reward.score(images, prompts), reward.score(images, prompts)
    assert first.shape == (N,) and first.dtype == np.float64
    assert np.isfinite(first).all() and np.ptp(first) > 0
    np.testing.assert_array_equal(first, second)
    assert not reward.per_user


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_identity_is_json_and_names_the_checked_digest(rewards, tiny, kind):
    identity = rewards[kind].identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["kind"] == kind and identity["model_id"] == f"tiny:{kind}"
    assert identity["weights_sha256"] == record(tiny, kind)["sha256"]


def test_scores_do_not_depend_on_the_internal_batching(rewards):
    rng = np.random.default_rng(1)
    n = BATCH_SIZE + 5
    images = render_images([CAPTIONS[0]] * n, rng.standard_normal((n, len(ATTRIBUTES))))
    prompts = [CAPTIONS[i % 4] for i in range(n)]
    whole = rewards["hps"].score(images, prompts)
    parts = [rewards["hps"].score(images[i : i + 7], prompts[i : i + 7]) for i in range(0, n, 7)]
    np.testing.assert_allclose(whole, np.concatenate(parts), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- the maths, recomputed


def _hf_logits(tiny: Path, kind: str, images: np.ndarray, prompts: list[str]) -> tuple[torch.Tensor, float]:
    """logits_per_image (N, N) of the CLIPModel's own forward, and its logit scale."""
    directory = kind_dir(tiny, kind)
    model = CLIPModel.from_pretrained(directory / "model").eval()
    processor = AutoProcessor.from_pretrained(directory / ("processor" if kind == "pickscore" else "model"))
    inputs = processor(
        text=prompts,
        images=[Image.fromarray(im) for im in images],
        padding=True,
        truncation=True,
        max_length=77,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.double()
    return logits, float(model.logit_scale.detach().exp())


def test_pickscore_is_logit_scale_times_cosine(rewards, tiny, batch):
    images, prompts = batch
    logits, _ = _hf_logits(tiny, "pickscore", images, prompts)
    expected = torch.diagonal(
        logits
    ).numpy()  # logit_scale.exp() * cos(image_i, text_i), as PickScore's README
    np.testing.assert_allclose(rewards["pickscore"].score(images, prompts), expected, rtol=1e-4, atol=1e-4)


def test_clip_score_is_100_times_clipped_cosine(rewards, tiny, batch):
    images, prompts = batch
    logits, scale = _hf_logits(tiny, "clip_score", images, prompts)
    expected = np.maximum(100 * torch.diagonal(logits).numpy() / scale, 0)  # torchmetrics CLIPScore
    got = rewards["clip_score"].score(images, prompts)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_hps_is_100_times_cosine_of_the_checkpoint(rewards, tiny, batch):
    images, prompts = batch
    directory = kind_dir(tiny, "hps")
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(directory / "arch"))
    model.load_state_dict(torch.load(directory / "HPS_tiny_compressed.pt", weights_only=True)["state_dict"])
    tokens = open_clip.get_tokenizer("local-dir:" + str(directory / "arch"))(prompts)
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        image_features, text_features, _ = model.eval()(pixels, tokens)  # L2-normalised, as hpsv2 reads them
    expected = 100 * torch.diagonal(image_features @ text_features.T).double().numpy()
    np.testing.assert_allclose(rewards["hps"].score(images, prompts), expected, rtol=1e-4, atol=1e-4)


def test_aesthetic_is_a_linear_mlp_on_normalised_clip_embeddings(rewards, tiny, batch):
    images, prompts = batch
    directory = kind_dir(tiny, "aesthetic")
    clip, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(directory / "clip"))
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        x = F.normalize(clip.eval().encode_image(pixels), dim=-1).double()  # (N, D)
    state = torch.load(directory / "aesthetic-mlp.pth", weights_only=True)
    for i in (0, 2, 4, 6, 7):  # no activations between the layers; dropout is off at inference
        x = x @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
    np.testing.assert_allclose(
        rewards["aesthetic"].score(images, prompts), x[:, 0].numpy(), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------- real loading path, explicit paths


def explicit_spec(tiny: Path, kind: str) -> RewardSpec:
    """The tiny weights named the way real ones are (a path in `model`, the processor beside)."""
    d = kind_dir(tiny, kind)
    files = {
        "pickscore": (d / "model", d / "processor"),
        "clip_score": (d / "model", None),
        "hps": (d / "HPS_tiny_compressed.pt", d / "arch"),
        "aesthetic": (d / "aesthetic-mlp.pth", d / "clip"),
    }
    model, processor = files[kind]
    return spec(kind, model=str(model), processor=None if processor is None else str(processor))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_weights_named_by_path_load_like_the_tiny_default(rewards, tiny, batch, kind):
    images, prompts = batch
    reward = load_reward(explicit_spec(tiny, kind), tiny_models_dir=None)
    np.testing.assert_array_equal(reward.score(images, prompts), rewards[kind].score(images, prompts))
    assert reward.identity()["weights_sha256"] == record(tiny, kind)["sha256"]


# ----------------------------------------------------------------------------------------- digests


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_wrong_sha256_is_refused(tiny, kind):
    with pytest.raises(RewardError, match="does not match the expected sha256"):
        load_reward(spec(kind, sha256="0" * 64), tiny)


def test_tiny_weights_are_checked_against_their_recorded_digest(tiny, tmp_path):
    shutil.copytree(kind_dir(tiny, "aesthetic"), tmp_path / TINY_DIR / "aesthetic")
    path = tmp_path / TINY_DIR / "aesthetic" / "aesthetic-mlp.pth"
    state = torch.load(path, weights_only=True)
    state["layers.7.bias"] += 1.0  # tampered after the build
    torch.save(state, path)
    with pytest.raises(RewardError, match="does not match"):
        load_reward(spec("aesthetic"), tmp_path)


def test_a_file_with_a_published_name_is_checked_against_the_published_digest(tiny, tmp_path):
    fake = tmp_path / "HPS_v2.1_compressed.pt"
    shutil.copy(kind_dir(tiny, "hps") / "HPS_tiny_compressed.pt", fake)
    hps = spec("hps", model=str(fake), processor=str(kind_dir(tiny, "hps") / "arch"))
    with pytest.raises(RewardError, match="published sha256 of HPS_v2.1_compressed.pt"):
        load_reward(hps)


# --------------------------------------------------------------------------------- synthetic world


def test_oracle_is_the_world_reward_of_each_user(world_dir, world, batch):
    images, prompts = batch
    users = [world.user_ids[i % 3] for i in range(N)]
    reward = load_reward(spec("oracle"), world_dir=world_dir)
    expected = [world.reward(u, images[i : i + 1])[0] for i, u in enumerate(users)]
    # measure_attributes works in float32: a group and a single image agree to ~1e-7
    np.testing.assert_allclose(reward.score(images, prompts, user_ids=users), expected, atol=1e-6)
    assert reward.per_user and reward.identity()["kind"] == "oracle"


def test_oracle_needs_user_ids(world_dir, batch):
    images, prompts = batch
    with pytest.raises(RewardError, match="user_ids"):
        load_reward(spec("oracle"), world_dir=world_dir).score(images, prompts)


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_oracle_attribute_is_one_world_attribute_column(world_dir, world, batch, attribute):
    images, prompts = batch
    reward = load_reward(spec("oracle_attribute", attribute=attribute), world_dir=world_dir)
    expected = world.attributes(images)[:, ATTRIBUTES.index(attribute)]
    np.testing.assert_array_equal(reward.score(images, prompts), expected)
    assert not reward.per_user


def test_unknown_attribute_names_the_valid_ones(world_dir):
    with pytest.raises(RewardError, match="unknown attribute 'sharpness'.*brightness, warmth"):
        load_reward(spec("oracle_attribute", attribute="sharpness"), world_dir=world_dir)


# ----------------------------------------------------------------------------- skips versus mistakes


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="ImageReward is installed")
def test_image_reward_is_skipped_with_a_reason_when_not_installed(tiny):
    with pytest.raises(RewardUnavailable):
        load_reward(spec("image_reward"), tiny)
    loaded, skipped = load_rewards([spec("image_reward", name="ir")], tiny)
    assert loaded == [] and "not installed" in skipped["ir"]


def test_load_rewards_skips_world_rewards_without_a_world(tiny):
    specs = EvaluateConfig().rewards  # oracle, 3 attributes, clip-score, aesthetic
    loaded, skipped = load_rewards(specs, tiny_models_dir=tiny, world_dir=None)
    world_names = {s.name for s in specs if s.kind in ("oracle", "oracle_attribute")}
    assert set(skipped) == world_names and all("synthetic world" in r for r in skipped.values())
    assert [r.name for r in loaded] == [s.name for s in specs if s.name not in world_names]


@pytest.mark.parametrize(
    ("reward", "match"),
    [
        (spec("aesthetic"), "no model and no tiny models"),
        (spec("hps", model="/nonexistent/HPS_v2_compressed.pt"), "not found"),
        (spec("pickscore", model="./no/such/dir"), "neither a local HF model directory"),
        (spec("clip_score", sha256="abc"), "64 hex digits"),
        (spec("oracle_attribute"), "needs `attribute`"),
    ],
)
def test_mistakes_raise_instead_of_being_skipped(tiny, world_dir, reward, match):
    tiny_dir = None if reward.kind == "aesthetic" else tiny
    with pytest.raises(PPDError, match=match):
        load_rewards([reward], tiny_models_dir=tiny_dir, world_dir=world_dir)


def test_missing_tiny_rewards_say_how_to_build_them(tmp_path):
    with pytest.raises(RewardError, match="rerun the tiny_models stage"):
        load_reward(spec("pickscore"), tmp_path)


def test_hps_checkpoint_that_does_not_fit_the_architecture_is_refused(tiny, tmp_path):
    state = load_file(kind_dir(tiny, "aesthetic") / "clip" / "open_clip_model.safetensors")
    state.pop("logit_scale")
    bad = tmp_path / "hps.pt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(RewardError, match="does not fit the architecture"):
        load_reward(spec("hps", model=str(bad), processor=str(kind_dir(tiny, "hps") / "arch")))

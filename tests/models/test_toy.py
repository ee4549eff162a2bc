"""The toy backbone, its offline text side, and the generic sampler: layouts on disk, exact reloads, the
v-prediction formulas, the user-token protocol and sampling determinism."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from ppd_core.config import PretrainConfig
from ppd_core.errors import StageError
from ppd_core.models.sampling import guided_prediction, initial_noise, sample
from ppd_core.models.text import VOCAB_SIZE, build_offline_clip_tokenizer, build_tiny_text_encoder
from ppd_core.models.toy import TOY_MAX_TOKENS, ToyBackbone, has_user_adapter

CFG = PretrainConfig()
CAPTIONS = ["a red circle", "a blue square", "an orange cross", "a green diamond", "a purple triangle"]


@pytest.fixture(scope="module")
def backbone() -> ToyBackbone:
    return ToyBackbone.create(CFG, resolution=16, seed=0)


@pytest.fixture(scope="module")
def saved(backbone, tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy") / "backbone"
    backbone.save(directory)
    return directory


class RecordingUserProcessor(AttnProcessor2_0):
    """Stands in for the user adapter: takes the user kwargs (so diffusers forwards them) and records them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 user_tokens=None, user_scale=1.0):  # fmt: skip
        self.calls.append((user_tokens, user_scale))
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if (
            user_tokens is not None and encoder_hidden_states is not None
        ):  # cross-attention: shift by the tokens
            out = out + user_scale * user_tokens.mean(dim=(1, 2))[:, None, None]
        return out


# ------------------------------------------------------------------------------------- text side


def test_offline_tokenizer_has_clips_vocabulary_and_open_clips_ids(tmp_path):
    tokenizer = build_offline_clip_tokenizer(tmp_path, model_max_length=77)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert len(tokenizer) == VOCAB_SIZE
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    reference = open_clip.SimpleTokenizer()(CAPTIONS)  # (5, 77), padded with 0
    for caption, ref in zip(CAPTIONS, reference, strict=True):
        ids = reloaded(caption).input_ids
        assert ids == tokenizer(caption).input_ids
        assert ids == ref[: len(ids)].tolist() and ids[0] == VOCAB_SIZE - 2 and ids[-1] == VOCAB_SIZE - 1
    assert reloaded.model_max_length == 77


def test_tiny_text_encoder_shape_seed_and_round_trip(tmp_path):
    encoder = build_tiny_text_encoder(CFG, seed=1)
    c = encoder.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (
        CFG.cross_attention_dim,
        CFG.text_layers,
        4,
    )
    assert (c.max_position_embeddings, c.vocab_size) == (77, VOCAB_SIZE)
    same, other = build_tiny_text_encoder(CFG, seed=1), build_tiny_text_encoder(CFG, seed=2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(encoder.state_dict().values(), same.state_dict().values(), strict=True)
    )
    embedding = encoder.get_input_embeddings().weight
    assert not torch.equal(embedding, other.get_input_embeddings().weight)
    encoder.save_pretrained(tmp_path)
    reloaded = CLIPTextModel.from_pretrained(tmp_path)
    ids = torch.tensor([[49406, 320, 736, 7117, 49407]])
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, reloaded(ids).last_hidden_state)


# ---------------------------------------------------------------------------------- the backbone


def test_unet_attends_only_at_the_deepest_level(backbone):
    unet = backbone.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    attention = [name for name, m in unet.named_modules() if isinstance(m, Attention)]
    assert attention and all(
        n.startswith(("down_blocks.1.", "mid_block.", "up_blocks.0.")) for n in attention
    )
    assert 0.2e6 < sum(p.numel() for p in unet.parameters()) < 0.35e6  # ~0.26 M at widths (16, 32)
    assert backbone.x0_shape == (3, 16, 16) and backbone.cross_attention_dim == CFG.cross_attention_dim


def test_save_writes_the_diffusers_layout(saved):
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {
        "backbone.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    } <= files
    meta = json.loads((saved / "backbone.json").read_text())
    assert meta["kind"] == "toy" and meta["resolution"] == 16 and meta["prediction_type"] == "v_prediction"
    sched = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["prediction_type"]) == ("squaredcos_cap_v2", "v_prediction")
    assert sched["clip_sample"] is False  # clipping x0 under guidance drifts (see ppd_core.models.toy)


def test_load_is_bit_identical(backbone, saved):
    loaded = ToyBackbone.load(saved)
    for name, net in backbone.networks().items():
        ours, theirs = net.state_dict(), loaded.networks()[name].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.identity() == backbone.identity()
    assert loaded.tokenizer.model_max_length == TOY_MAX_TOKENS
    assert not any(p.requires_grad for p in loaded.unet.parameters()) and not loaded.unet.training
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 900])
    with torch.no_grad():
        text = backbone.encode_prompt(CAPTIONS[:2])
        assert torch.equal(text, loaded.encode_prompt(CAPTIONS[:2]))
        assert torch.equal(backbone.denoise(x, t, text), loaded.denoise(x, t, text))


def test_load_refuses_other_directories(tmp_path):
    with pytest.raises(StageError, match="not a toy backbone"):
        ToyBackbone.load(tmp_path)


def test_identity_follows_the_weights(backbone):
    identity = backbone.identity()
    assert identity["kind"] == identity["model_id"] == "toy" and identity["resolution"] == 16
    assert len(identity["weights_digest"]) == 64
    other = ToyBackbone.create(CFG, resolution=16, seed=1)
    assert other.identity()["weights_digest"] != identity["weights_digest"]


def test_encode_decode_round_trips_pixels(backbone):
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    x0 = backbone.encode_images(images)  # (3, 3, 16, 16)
    assert x0.shape == (3, 3, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    back = (backbone.decode(x0) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(back, images)
    floats = images.permute(0, 3, 1, 2).float() / 255
    assert torch.equal(backbone.encode_images(floats), x0)
    assert backbone.decode(torch.full((1, 3, 16, 16), 3.0)).max() == 1.0
    with pytest.raises(ValueError, match="16 px"):
        backbone.encode_images(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))


def test_noise_and_v_target_follow_the_cosine_schedule(backbone):
    g = torch.Generator().manual_seed(0)
    t = backbone.sample_timesteps(4096, g)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < CFG.num_train_timesteps
    assert torch.equal(t, backbone.sample_timesteps(4096, torch.Generator().manual_seed(0)))
    x0, noise = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randn(8, 3, 16, 16)
    t = torch.tensor([0, 1, 100, 250, 500, 750, 990, 999])
    abar = backbone.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    # cosine schedule (Nichol & Dhariwal): alpha_bar(t) ~ cos^2((t/T + s) / (1 + s) * pi / 2)
    f = torch.cos(((t.double() + 1) / CFG.num_train_timesteps + 0.008) / 1.008 * torch.pi / 2) ** 2
    f0 = np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    assert torch.allclose(abar.flatten().double(), f / f0, atol=1e-3)
    x_t = backbone.add_noise(x0, noise, t)
    v = backbone.target(x0, noise, t)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    assert torch.allclose(abar.sqrt() * x_t - (1 - abar).sqrt() * v, x0, atol=1e-5)  # v recovers x0


def test_inference_scheduler_is_ddim_on_trailing_timesteps(backbone):
    sched = backbone.inference_scheduler(20)
    assert isinstance(sched, DDIMScheduler) and len(sched.timesteps) == 20
    assert (
        sched.timesteps[0] == CFG.num_train_timesteps - 1 and sched.config.prediction_type == "v_prediction"
    )


def test_user_tokens_without_an_adapter_are_an_error(backbone):
    x, t, text = torch.zeros(1, 3, 16, 16), torch.tensor([5]), torch.zeros(1, TOY_MAX_TOKENS, 64)
    assert not has_user_adapter(backbone.unet)
    with pytest.raises(RuntimeError, match="no user adapter is installed"):
        backbone.denoise(x, t, text, user_tokens=torch.zeros(1, 4, 64))


def test_user_tokens_reach_an_installed_processor():
    bb = ToyBackbone.create(CFG, resolution=16, seed=0)
    processors = {name: RecordingUserProcessor() for name in bb.unet.attn_processors}
    bb.unet.set_attn_processor(processors)
    assert has_user_adapter(bb.unet)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 20])
    with torch.no_grad():
        text = bb.encode_prompt(CAPTIONS[:2])
        base = bb.denoise(x, t, text)
        assert all(calls == [(None, 1.0)] for calls in (p.calls for p in processors.values()))
        tokens = torch.ones(2, 4, 64)
        shifted = bb.denoise(x, t, text, user_tokens=tokens, user_scale=0.5)
    assert all(p.calls[-1][0] is tokens and p.calls[-1][1] == 0.5 for p in processors.values())
    assert not torch.equal(base, shifted)


# -------------------------------------------------------------------------------------- sampling


def test_a_seed_gives_the_same_image_in_any_batch(backbone):
    captions, seeds = CAPTIONS * 2, list(range(10))
    together = sample(backbone, captions, seeds, steps=4, batch_size=64)
    assert together.shape == (10, 3, 16, 16) and together.min() >= 0 and together.max() <= 1
    split = sample(backbone, captions, seeds, steps=4, batch_size=3)
    alone = sample(backbone, captions[7:8], seeds[7:8], steps=4)
    shuffled = sample(backbone, captions[::-1], seeds[::-1], steps=4, batch_size=4)
    # equal up to float rounding of batched kernels (oneDNN blocks by batch size): well below 1/255
    torch.testing.assert_close(split, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], together[7], atol=1e-5, rtol=0)
    torch.testing.assert_close(shuffled.flip(0), together, atol=1e-5, rtol=0)
    assert torch.equal(sample(backbone, captions, seeds, steps=4), together)  # same call: bit-identical
    assert (together[0] - together[5]).abs().max() > 0.05  # same caption, different seed


def test_initial_noise_is_per_seed():
    noise = initial_noise((3, 4, 4), [7, 8, 7])
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(noise[1], torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(8)))


def test_guidance_changes_the_images(backbone):
    backbone.unet.train()
    plain = sample(backbone, CAPTIONS, range(5), steps=4, guidance=1.0)
    guided = sample(backbone, CAPTIONS, range(5), steps=4, guidance=3.0)
    assert (plain - guided).abs().max() > 1e-3
    assert backbone.unet.training  # sampled in eval mode, then the caller's mode is restored


class AffineBackbone:
    """A stand-in with an analytic denoiser: text mean + 10 * user-token mean * scale."""

    def denoise(self, x, t, text, user_tokens=None, user_scale=1.0):
        user = 0.0 if user_tokens is None else 10.0 * user_scale * user_tokens.mean()
        return torch.zeros_like(x) + text.mean() + user


def test_guidance_formula():
    x, t = torch.zeros(2, 3, 4, 4), torch.tensor(999)
    text, uncond, tokens = torch.full((2, 3, 8), 2.0), torch.zeros(2, 3, 8), torch.ones(2, 4, 8)
    bb = AffineBackbone()
    # uncond = 0, plain = 2, cond = 2 + 10 * 0.5 = 7
    pred = guided_prediction(bb, x, t, text, uncond, 3.0, tokens, 0.5, user_guidance=2.0)
    assert torch.allclose(pred, torch.full_like(x, 0 + 3.0 * 7 + 2.0 * (7 - 2)))
    assert torch.allclose(
        guided_prediction(bb, x, t, text, uncond, 3.0, tokens, 0.5, 0.0), torch.full_like(x, 21.0)
    )
    assert torch.allclose(
        guided_prediction(bb, x, t, text, uncond, 3.0, None, 1.0, 5.0), torch.full_like(x, 6.0)
    )
    assert torch.allclose(
        guided_prediction(bb, x, t, text, uncond, 1.0, None, 1.0, 0.0), torch.full_like(x, 2.0)
    )


def test_sampling_with_user_tokens_needs_and_uses_the_adapter():
    bb = ToyBackbone.create(CFG, resolution=16, seed=0)
    tokens = torch.ones(4, 64) * 0.1  # (T_u, D) shared by every image
    with pytest.raises(RuntimeError, match="no user adapter"):
        sample(bb, CAPTIONS[:2], [0, 1], steps=2, user_tokens=tokens)
    bb.unet.set_attn_processor(RecordingUserProcessor())
    base = sample(bb, CAPTIONS[:2], [0, 1], steps=3)
    user = sample(bb, CAPTIONS[:2], [0, 1], steps=3, user_tokens=tokens)
    more = sample(bb, CAPTIONS[:2], [0, 1], steps=3, user_tokens=tokens, user_guidance=2.0)
    assert (user - base).abs().max() > 1e-3 and (more - user).abs().max() > 1e-3
    assert torch.equal(sample(bb, CAPTIONS[:2], [0, 1], steps=3, user_tokens=tokens, user_scale=0.0), base)


def test_cache_latents_reports_progress_after_every_batch(backbone, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ppd_core.config import IngestConfig
    from ppd_core.data.images import ImageShardWriter, check_image
    from ppd_core.train.cache import cache_latents
    from tests.data.pickapic_factory import image_bytes

    uids = [f"img-{i}" for i in range(5)]
    with ImageShardWriter(tmp_path / "ingest" / "images", 100) as writer:
        for i, uid in enumerate(uids):
            data = image_bytes(i, size=16)
            writer.add(uid, data, check_image(data, IngestConfig()))
    fewshot = tmp_path / "fewshot"
    fewshot.mkdir()
    pairs = {"caption": ["a red circle", "a blue square"], "winner_uid": uids[:2], "loser_uid": uids[2:4]}
    pq.write_table(pa.table(pairs), fewshot / "train_pairs.parquet")
    pq.write_table(
        pa.table({"caption": ["a"], "winner_uid": uids[4:], "loser_uid": uids[:1]}),
        fewshot / "eval_pairs.parquet",
    )
    calls = []
    out = tmp_path / "cache"
    out.mkdir()
    counts = cache_latents(
        backbone, tmp_path / "ingest", fewshot, out, batch=2, progress=lambda *a: calls.append(a)
    )
    total = counts["images"] + counts["captions"]  # 5 images, 4 captions ("" included)
    assert calls == [(2, total), (4, total), (5, total), (7, total), (9, total)]

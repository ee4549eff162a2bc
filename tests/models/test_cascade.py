"""The Stable Cascade backbone on a tiny random prior: checkpoint layout and reload, the text contract,
agreement with diffusers' StableCascadePriorPipeline, the Wuerstchen schedule, the user branch's
exactness and gradients, sampling, Stable Cascade's EfficientNet encoder (Stage-C training latents, the
latent cache and the first DPO loss on them) and the decoder it does not own."""

from __future__ import annotations

import copy
import json
import math
import warnings

import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from diffusers import DDPMWuerstchenScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import safe_open

from ppd_core.config import BackboneConfig, IngestConfig
from ppd_core.data.images import ImageShardWriter, ImageStore, check_image
from ppd_core.errors import ConfigError, InputError, PPDError, StageError
from ppd_core.models.adapter import UserAdapter
from ppd_core.models.cascade import (
    DECODER_HUB,
    DECODER_SUBDIR,
    TINY_RESOLUTION,
    CascadeBackbone,
    CascadeSamplingScheduler,
    CascadeUnsupportedError,
    build_tiny_cascade,
    build_tiny_cascade_decoder,
    cascade_attention_blocks,
    default_decoder,
    tiny_prior,
    tiny_text_encoder,
)
from ppd_core.models.effnet import (
    EFFNET_FILE,
    EFFNET_HUB,
    default_effnet,
    effnet_preprocess,
    load_effnet,
    resolve_effnet_file,
    tiny_effnet,
)
from ppd_core.models.toy import state_digest
from ppd_core.train.cache import LatentCache, cache_latents
from tests.data.pickapic_factory import image_bytes

CAPTIONS = ["a red circle", ""]
BRANCH_KEYS = ["down_blocks-0-2", "down_blocks-1-2", "up_blocks-0-2", "up_blocks-1-2"]
SMALL_RESOLUTION = (
    128  # ceil(128 / 42.67) = 3: x0 (16, 3, 3) from 96 px encoder inputs (tiny_effnet's calibration size)
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_cascade(tmp_path_factory.mktemp("cascade"), seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return CascadeBackbone.load(tiny_dir)


@pytest.fixture(scope="module")
def small(tiny_dir):
    """The tiny prior at :data:`SMALL_RESOLUTION`, with the tiny checkpoint's own EfficientNet encoder."""
    return CascadeBackbone.load(tiny_dir, resolution=SMALL_RESOLUTION)


@pytest.fixture
def backbone(loaded):
    """A private copy: tests install branches and switch modes on it."""
    return copy.deepcopy(loaded)


def inputs(bb: CascadeBackbone, seed: int = 0):
    """(x_t, t, text) for CAPTIONS."""
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(len(CAPTIONS), *bb.x0_shape, generator=g)
    t = torch.rand(len(CAPTIONS), generator=g)
    return x_t, t, bb.encode_prompt(CAPTIONS)


def user_tokens(bb: CascadeBackbone, n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(CAPTIONS), n, bb.cross_attention_dim, generator=g)  # (B, N, D)


def install(bb: CascadeBackbone) -> torch.nn.ModuleDict:
    """A fresh adapter through the backbone's one adapter mechanism, installed; returns its branches."""
    adapter = bb.new_adapter((8,), num_tokens=4)
    bb.install_adapter(adapter)
    return adapter.branches


def set_gates(branches, value: float) -> None:
    with torch.no_grad():
        for branch in branches.values():
            branch.gate.fill_(value)


# ------------------------------------------------------------------------------------------ checkpoint


def test_tiny_checkpoint_has_the_stable_cascade_prior_layout(tiny_dir):
    for path in (
        "model_index.json",
        "prior/config.json",
        "prior/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "backbone.json",
        "effnet_encoder.safetensors",
        "decoder_pipeline/model_index.json",  # Stages B/A, the local default decoder
        "decoder_pipeline/decoder/config.json",
        "decoder_pipeline/vqgan/config.json",
    ):
        assert (tiny_dir / path).is_file(), path
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableCascadePriorPipeline"
    assert index["prior"] == ["diffusers", "StableCascadeUNet"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "DDPMWuerstchenScheduler"]
    assert index["resolution_multiple"] == 42.67
    assert json.loads((tiny_dir / "backbone.json").read_text())["kind"] == "cascade"


def test_load_is_bit_identical_to_the_built_weights_and_survives_save(tiny_dir, tmp_path):
    bb = CascadeBackbone.load(tiny_dir)
    built = {"prior": tiny_prior(0), "text_encoder": tiny_text_encoder(0)}
    assert state_digest(built) == state_digest(bb.networks())
    bb.save(tmp_path / "again")
    again = CascadeBackbone.load(tmp_path / "again")
    assert again.identity() == {**bb.identity(), "model_id": str(tmp_path / "again")}
    assert again.effnet == str(tmp_path / "again" / EFFNET_FILE)  # the local encoder file travels along
    for name, net in bb.networks().items():
        other = again.networks()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in net.state_dict().items()), name
    assert not any(p.requires_grad for net in again.networks().values() for p in net.parameters())
    assert not again.prior.training  # dropout (0.1 in the prior's config) is off


def test_identity_and_shapes(backbone):
    ident = backbone.identity()
    assert ident["kind"] == "cascade" and ident["prediction_type"] == "epsilon"
    assert ident["resolution"] == TINY_RESOLUTION
    assert backbone.x0_shape == (16, 8, 8) == tuple(ident["x0_shape"])
    assert backbone.cross_attention_dim == backbone.prior.config.conditioning_dim
    assert CascadeBackbone.load(backbone.model_id, resolution=1024).x0_shape == (
        16,
        24,
        24,
    )  # the paper's 1024 px


def test_from_config_reads_the_backbone_section(tiny_dir):
    cfg = BackboneConfig(kind="cascade", model=str(tiny_dir), resolution=1024, dtype="bfloat16")
    bb = CascadeBackbone.from_config(cfg)
    assert bb.x0_shape == (16, 24, 24) and bb.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="epsilon"):
        CascadeBackbone.from_config(cfg.model_copy(update={"prediction_type": "v_prediction"}))


def test_not_a_prior_is_a_readable_error(tmp_path):
    with pytest.raises(PPDError, match="not a Stable Cascade prior"):
        CascadeBackbone.load(tmp_path)


def test_diffusers_prior_pipeline_reads_the_layout_and_samples_like_our_loop(backbone):
    """Our encode_prompt / denoise / inference_scheduler reproduce StableCascadePriorPipeline (no CFG) bit for bit."""
    from diffusers import StableCascadePriorPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableCascadePriorPipeline.from_pretrained(backbone.model_id)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=CAPTIONS,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).image_embeddings

    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(CAPTIONS), *backbone.x0_shape, generator=g)
    sched = backbone.inference_scheduler(3, generator=g)
    text = backbone.encode_prompt(CAPTIONS)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(backbone.denoise(x, t, text), t, x).prev_sample
    assert torch.equal(x, expected)


# ------------------------------------------------------------------------------------------ text and denoise


def test_encode_prompt_appends_the_pooled_embedding_as_a_last_token(backbone):
    text = backbone.encode_prompt(CAPTIONS)
    assert text.shape == (2, 77 + 1, backbone.text_dim)
    ids = backbone.tokenizer(
        CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    out = backbone.text_encoder(ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True)
    assert torch.equal(text[:, :-1], out.hidden_states[-1])
    assert torch.equal(text[:, -1], out.text_embeds)


def test_denoise_shape_dtype_and_scalar_t(backbone):
    x_t, t, text = inputs(backbone)
    eps = backbone.denoise(x_t, t, text)
    assert eps.shape == x_t.shape and eps.dtype == torch.float32 and eps.isfinite().all()
    same_t = backbone.denoise(x_t, torch.full((2,), 0.5), text)
    assert torch.equal(backbone.denoise(x_t, torch.tensor(0.5), text), same_t)
    with pytest.raises(InputError, match="encode_prompt"):
        backbone.denoise(x_t, t, text[:, :, :8])


# ------------------------------------------------------------------------------------------ schedule


def test_sample_timesteps_are_seeded_ratios_in_unit_interval(backbone):
    t = backbone.sample_timesteps(256, torch.Generator().manual_seed(0))
    assert t.shape == (256,) and t.dtype == torch.float32
    assert t.min() >= 0.0 and t.max() < 1.0
    assert torch.equal(t, backbone.sample_timesteps(256, torch.Generator().manual_seed(0)))


def test_add_noise_and_target_follow_the_wuerstchen_cosine_schedule(backbone):
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(4, *backbone.x0_shape, generator=g),
        torch.randn(4, *backbone.x0_shape, generator=g),
    )
    t = torch.tensor([0.0, 0.25, 0.7, 0.999])
    s = 0.008
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar.clamp(1e-4, 0.9999).view(-1, 1, 1, 1)
    x_t = backbone.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    assert torch.equal(x_t, DDPMWuerstchenScheduler(s=s).add_noise(x0, noise, t))
    assert torch.equal(backbone.target(x0, noise, t), noise)  # epsilon prediction


def test_inference_scheduler_steps_to_finite_latents(backbone):
    text = backbone.encode_prompt(CAPTIONS)

    def sample() -> torch.Tensor:
        sched = backbone.inference_scheduler(4)  # step noise from its own generator, seeded 0
        assert isinstance(sched, CascadeSamplingScheduler) and isinstance(sched, DDPMWuerstchenScheduler)
        torch.testing.assert_close(sched.timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25]))  # never t = 0
        x = torch.randn(2, *backbone.x0_shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(backbone.denoise(x, t, text), t, x).prev_sample
        return x

    x = sample()
    assert x.shape == (2, *backbone.x0_shape) and x.isfinite().all()
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(sample(), x)


# ------------------------------------------------------------------------------------------ user branch


def test_install_returns_one_branch_per_attention_block_with_stable_keys(backbone):
    before = set(backbone.prior.state_dict())
    branches = install(backbone)
    assert sorted(branches) == BRANCH_KEYS
    assert sorted(n for n, _ in branches["up_blocks-0-2"].named_parameters()) == [
        "gate",
        "to_k_u.weight",
        "to_v_u.weight",
    ]
    assert set(backbone.prior.state_dict()) == before  # branch weights live only in the adapter
    for name, block in cascade_attention_blocks(backbone.prior).items():
        branch, attn, mapper = branches[name.replace(".", "-")], block.attention, block.kv_mapper[1]
        assert branch.gate.item() == 0.0
        assert branch.to_k_u.bias is None and branch.to_v_u.bias is None
        torch.testing.assert_close(branch.to_k_u.weight, attn.to_k.weight @ mapper.weight)
        torch.testing.assert_close(branch.to_v_u.weight, attn.to_v.weight @ mapper.weight)
    backbone.uninstall_adapter()
    procs = [b.attention.processor for b in cascade_attention_blocks(backbone.prior).values()]
    assert all(type(p) is AttnProcessor2_0 for p in procs)


def test_wrong_user_token_width_is_refused(backbone):
    wide = UserAdapter((8,), backbone.cross_attention_dim + 1, backbone.adapter_layers())
    with pytest.raises(ConfigError, match="conditioning_dim"):
        backbone.install_adapter(wide)
    other = UserAdapter((8,), backbone.cross_attention_dim, {"down_blocks.0.2": 32})
    with pytest.raises(ConfigError, match="other attention blocks"):
        backbone.install_adapter(other)


def test_fresh_branch_is_exactly_the_base_model(backbone):
    x_t, t, text = inputs(backbone)
    base = backbone.denoise(x_t, t, text)
    install(backbone)
    assert torch.equal(backbone.denoise(x_t, t, text, user_tokens(backbone)), base)


@pytest.mark.parametrize(
    "case",
    ["no tokens", "scale 0", "per-sample scale 0", "zero tokens"],
)
def test_open_gates_are_still_exactly_the_base_model_without_a_user(backbone, case):
    x_t, t, text = inputs(backbone)
    base = backbone.denoise(x_t, t, text)
    set_gates(install(backbone), 0.7)
    u = user_tokens(backbone)
    out = {
        "no tokens": lambda: backbone.denoise(x_t, t, text, None, 1.0),
        "scale 0": lambda: backbone.denoise(x_t, t, text, u, 0.0),
        "per-sample scale 0": lambda: backbone.denoise(x_t, t, text, u, torch.zeros(2)),
        "zero tokens": lambda: backbone.denoise(x_t, t, text, torch.zeros_like(u), 1.0),
    }[case]()
    assert torch.equal(out, base)


def test_open_gates_with_a_user_change_the_prediction_per_sample(backbone):
    x_t, t, text = inputs(backbone)
    base = backbone.denoise(x_t, t, text)
    set_gates(install(backbone), 0.7)
    u = user_tokens(backbone)
    assert (backbone.denoise(x_t, t, text, u) - base).abs().amax() > 1e-3
    mixed = backbone.denoise(x_t, t, text, u, torch.tensor([1.0, 0.0]))  # second sample: null user
    assert not torch.equal(mixed[0], base[0])
    assert torch.equal(mixed[1], base[1])
    assert all(
        b.attention.processor.user_tokens is None for b in cascade_attention_blocks(backbone.prior).values()
    )


def test_only_branch_parameters_receive_gradients(backbone):
    x_t, t, text = inputs(backbone)
    branches = install(backbone)
    set_gates(branches, 0.1)  # at gate 0 only the gates would get gradient
    u = user_tokens(backbone)
    backbone.denoise(x_t, t, text, u).square().mean().backward()
    for name, p in branches.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in backbone.prior.parameters())
    assert all(p.grad is None for p in backbone.text_encoder.parameters())


def test_user_tokens_need_an_installed_branch_and_no_gradient_checkpointing(backbone):
    x_t, t, text = inputs(backbone)
    u = user_tokens(backbone)
    with pytest.raises(RuntimeError, match="install_adapter"):
        backbone.denoise(x_t, t, text, u)
    install(backbone)
    with pytest.raises(InputError, match="batch"):
        backbone.denoise(x_t, t, text, u[:1])
    backbone.prior.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        backbone.denoise(x_t, t, text, u)


# ------------------------------------------------------------------------------------------ stages A/B


def test_decode_without_a_decoder_is_refused(tmp_path):
    prior_only = CascadeBackbone.load(build_tiny_cascade(tmp_path / "prior", decoder=False))
    assert prior_only.decoder_model is None
    with pytest.raises(CascadeUnsupportedError, match="backbone.decoder"):
        prior_only.decode(torch.zeros(1, *prior_only.x0_shape))


def test_decoder_defaults_to_the_local_stages_b_a_or_the_official_pair(tiny_dir, tmp_path):
    assert (tiny_dir / DECODER_SUBDIR / "model_index.json").is_file()
    assert default_decoder(tiny_dir) == str(tiny_dir / DECODER_SUBDIR)
    assert default_decoder("stabilityai/stable-cascade-prior") == DECODER_HUB
    assert default_decoder(tmp_path) is None  # a local prior without Stages B/A: decoding asks for one
    cfg = BackboneConfig(kind="cascade", model=str(tiny_dir), decoder=str(tmp_path / "elsewhere"))
    assert CascadeBackbone.from_config(cfg).decoder_model == str(tmp_path / "elsewhere")


def test_decode_through_a_decoder_pipeline_gives_reproducible_images(tiny_dir, tmp_path):
    build_tiny_cascade_decoder(tmp_path / "decoder")
    bb = CascadeBackbone.load(tiny_dir, decoder_model=tmp_path / "decoder")
    x0 = torch.randn(2, *bb.x0_shape, generator=torch.Generator().manual_seed(0))
    images = bb.decode(x0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.equal(bb.decode(x0), images)  # seeded Stage-B noise by default
    assert torch.equal(CascadeBackbone.load(tiny_dir).decode(x0), images)  # the checkpoint's own, same seed


def test_bfloat16_prior_with_float32_branches(tiny_dir, loaded):
    bb = CascadeBackbone.load(tiny_dir, dtype=torch.bfloat16)
    assert bb.dtype == torch.bfloat16 and bb.text_encoder.dtype == torch.bfloat16
    assert bb.identity()["weights_digest"] != loaded.identity()["weights_digest"]
    branches = install(bb)
    assert all(p.dtype == torch.float32 for p in branches.parameters())  # master weights stay fp32
    set_gates(branches, 0.5)
    x_t, t, text = inputs(bb)
    eps = bb.denoise(x_t, t, text, user_tokens(bb))
    assert eps.dtype == torch.float32 and eps.isfinite().all()
    assert not torch.equal(eps, bb.denoise(x_t, t, text))


# ------------------------------------------------------------------------------------------ the EfficientNet encoder


def test_effnet_file_has_the_stable_cascade_key_layout_and_loads_exactly(tiny_dir):
    path = tiny_dir / EFFNET_FILE
    built = tiny_effnet(0)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(built.state_dict())
    assert {
        "backbone.0.0.weight",  # torchvision efficientnet_v2_s().features under "backbone."
        "backbone.1.0.block.0.1.num_batches_tracked",  # the key ComfyUI recognises the real file by
        "backbone.7.0.weight",  # the last 1x1 conv to 1280 channels
        "mapper.0.weight",
        "mapper.1.running_mean",
        "mapper.1.running_var",
    } <= keys
    assert (
        "mapper.0.bias" not in keys and "mapper.1.weight" not in keys
    )  # Conv2d(bias=False), BatchNorm2d(affine=False)
    encoder = load_effnet(path)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    g = torch.Generator().manual_seed(0)
    x = effnet_preprocess(torch.rand(2, 3, 96, 96, generator=g), 96)  # (B, 3, 96, 96)
    with torch.no_grad():
        out = encoder(x)
        assert torch.equal(out, built(x))
    assert out.shape == (2, 16, 3, 3) and out.isfinite().all() and 0.1 < out.std() < 100


def test_effnet_sources_local_default_and_hub(tiny_dir, monkeypatch):
    local = tiny_dir / EFFNET_FILE
    assert default_effnet(tiny_dir) == str(local)
    assert default_effnet("stabilityai/stable-cascade-prior") == EFFNET_HUB
    assert resolve_effnet_file(tiny_dir) == local  # a directory holding the file
    calls = []

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_effnet_file(EFFNET_HUB) == local
    assert calls == [("stabilityai/stable-cascade", "effnet_encoder.safetensors")]
    with pytest.raises(StageError, match="no such file"):
        resolve_effnet_file(tiny_dir / "missing.safetensors")
    with pytest.raises(StageError, match="not Stable Cascade's EfficientNet encoder"):
        load_effnet(tiny_dir / "prior" / "diffusion_pytorch_model.safetensors")
    cfg = BackboneConfig(kind="cascade", model=str(tiny_dir), resolution=SMALL_RESOLUTION)
    assert CascadeBackbone.from_config(cfg).effnet == str(local)
    assert CascadeBackbone.from_config(cfg.model_copy(update={"effnet": EFFNET_HUB})).effnet == EFFNET_HUB


def test_encode_images_gives_stage_c_latents_as_train_c_does(small, tiny_dir):
    assert small.x0_shape == (16, 3, 3)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8, generator=g)  # (B, H, W, 3)
    x0 = small.encode_images(pixels)
    assert x0.shape == (2, *small.x0_shape) and x0.dtype == torch.float32 and x0.isfinite().all()
    assert torch.equal(small.encode_images(pixels), x0)  # deterministic
    floats = pixels.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
    assert torch.equal(small.encode_images(floats), x0)
    # train_c.py's path spelled with torchvision: Resize (bilinear, antialias) to 32 x 3 px, ImageNet Normalize
    resized = TF.resize(floats, [96, 96], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    normed = TF.normalize(resized, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    with torch.no_grad():
        torch.testing.assert_close(x0, small._effnet(normed))  # unscaled latents
    # the encoder stays float32 under a bf16 prior (train_c.py keeps it out of autocast)
    bf16 = CascadeBackbone.load(tiny_dir, resolution=SMALL_RESOLUTION, dtype=torch.bfloat16)
    assert torch.equal(bf16.encode_images(pixels), x0)


def test_cache_latents_on_the_tiny_cascade_then_the_first_dpo_loss_is_ln2(small, tmp_path):
    from ppd_core.train.objectives import OBJECTIVES

    uids = [f"img-{i}" for i in range(6)]
    with ImageShardWriter(tmp_path / "ingest" / "images", 100) as writer:
        for i, uid in enumerate(uids):
            data = image_bytes(i, size=32)
            writer.add(uid, data, check_image(data, IngestConfig()))
    pairs = {"caption": ["a red circle", "a blue square", ""], "winner_uid": uids[:3], "loser_uid": uids[3:]}
    fewshot = tmp_path / "fewshot"
    fewshot.mkdir()
    pq.write_table(pa.table(pairs), fewshot / "train_pairs.parquet")
    pq.write_table(pa.table({k: v[:1] for k, v in pairs.items()}), fewshot / "eval_pairs.parquet")
    out = tmp_path / "cache"
    out.mkdir()
    counts = cache_latents(small, tmp_path / "ingest", fewshot, out, batch=4)
    assert (
        counts["images"] == 6 and counts["x0_shape"] == [16, 3, 3] and counts["captions"] == 3
    )  # "" among them

    cache = LatentCache(out)
    x0 = cache.x0(pairs["winner_uid"] + pairs["loser_uid"])  # (2P, 16, 3, 3): [winners | losers]
    pixels = ImageStore(tmp_path / "ingest" / "images").get_array(uids, size=SMALL_RESOLUTION)
    torch.testing.assert_close(x0, small.encode_images(torch.from_numpy(pixels)))
    text = cache.text(pairs["caption"] * 2)  # (2P, 78, text_dim)

    bb = copy.deepcopy(small)
    adapter = bb.new_adapter((8,), num_tokens=4)  # the real adapter, as the trainer builds it
    bb.install_adapter(adapter)
    branches = adapter.branches
    emb = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))  # (P, D) user embeddings

    def first_loss():
        g = torch.Generator().manual_seed(0)
        return OBJECTIVES["ppd"].loss(bb, adapter, x0, text, emb, 2500.0, g, 0.0, 1.0)

    loss, metrics = first_loss()  # gates 0: policy == reference
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and metrics["implicit_acc"] == 0.5
    set_gates(branches, 0.5)
    assert first_loss()[0].item() != pytest.approx(math.log(2), abs=1e-4)  # the branch is live

"""The Stable Diffusion backbone on tiny random SD 1.x- and XL-style checkpoints in the real layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from ppd_core.config import BackboneConfig
from ppd_core.errors import ConfigError, InputError
from ppd_core.models.sd import SDBackbone, build_tiny_sd

RES = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_sd")
    return {"sd": str(build_tiny_sd(root / "sd")), "xl": str(build_tiny_sd(root / "xl", xl=True))}


def load(checkpoint: str, **kw) -> SDBackbone:
    return SDBackbone(BackboneConfig(kind="sd", model=checkpoint, resolution=RES, **kw))


@pytest.fixture(scope="module", params=["sd", "xl"])
def backbone(request, checkpoints) -> SDBackbone:
    return load(checkpoints[request.param])


@pytest.mark.parametrize(
    ("xl", "folders"),
    [
        (False, ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]),
        (True, ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]),
    ],
)
def test_tiny_checkpoint_has_the_real_layout(checkpoints, xl, folders):
    root = Path(checkpoints["xl" if xl else "sd"])
    assert (root / "model_index.json").is_file()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == folders
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (root / "tokenizer" / "vocab.json").is_file() and (root / "tokenizer" / "merges.txt").is_file()


def test_loads_frozen_and_in_eval(backbone):
    for module in (backbone.unet, backbone.vae, *backbone.text_encoders):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert backbone.denoiser is backbone.unet
    assert backbone.prediction_type == "epsilon"  # what the checkpoint's scheduler says


def test_tokenizer_is_clip_bpe(backbone):
    ids = backbone.tokenizers[0](["a photo of a cat"]).input_ids[0]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # open_clip's ids for the same text
    assert backbone.tokenizers[0].model_max_length == 77


def test_shapes_of_every_interface_call(backbone):
    g = torch.Generator().manual_seed(0)
    assert backbone.x0_shape == (4, RES // 2, RES // 2)
    text = backbone.encode_prompt(["a red square", ""])
    rows = 78 if backbone.is_xl else 77  # XL packs the pooled embedding as one extra row
    assert text.shape == (2, rows, backbone.cross_attention_dim)
    uint8 = torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8, generator=g)  # cropped and resized
    x0 = backbone.encode_images(uint8, torch.Generator().manual_seed(1))
    assert x0.shape == (2, *backbone.x0_shape)
    again = backbone.encode_images(uint8, torch.Generator().manual_seed(1))
    assert torch.equal(x0, again)  # the posterior sample follows the generator
    floats = torch.rand(2, 3, RES, RES, generator=g)
    assert backbone.encode_images(floats).shape == x0.shape
    images = backbone.decode(x0)
    assert images.shape == (2, 3, RES, RES) and images.min() >= 0 and images.max() <= 1
    t = backbone.sample_timesteps(2, g)
    assert t.shape == (2,) and t.min() >= 0 and t.max() < 1000
    noise = torch.randn(x0.shape, generator=g)
    prediction = backbone.denoise(backbone.add_noise(x0, noise, t), t, text)
    assert prediction.shape == backbone.target(x0, noise, t).shape == x0.shape


def test_xl_empty_caption_is_zero_and_text_rows_are_checked(checkpoints):
    xl = load(checkpoints["xl"])
    text = xl.encode_prompt(["", "a cat"])
    assert not text[0].any() and text[1, -1].any()
    with pytest.raises(InputError, match="encode_prompt"):
        xl.denoise(torch.zeros(1, *xl.x0_shape), torch.tensor([1]), text[:1, :-1])


def test_prediction_type_override_sets_the_target(checkpoints):
    backbone = load(checkpoints["sd"], prediction_type="v_prediction")
    assert backbone.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(2, *backbone.x0_shape, generator=g),
        torch.randn(2, *backbone.x0_shape, generator=g),
    )
    t = torch.tensor([10, 900])
    alpha = backbone.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    torch.testing.assert_close(backbone.target(x0, noise, t), expected)
    assert backbone.inference_scheduler(2).config.prediction_type == "v_prediction"


def test_inference_scheduler_runs_a_sampling_loop(backbone):
    sched = backbone.inference_scheduler(3)
    assert isinstance(sched, DDIMScheduler) and sched.config.timestep_spacing == "trailing"
    assert sched.timesteps[0] == 999 and len(sched.timesteps) == 3
    text = backbone.encode_prompt(["a blue circle"])
    x = torch.randn(1, *backbone.x0_shape, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(backbone.denoise(x, t, text), t, x).prev_sample
    assert torch.isfinite(x).all() and backbone.decode(x).shape == (1, 3, RES, RES)


def test_user_tokens_need_an_installed_adapter_which_then_starts_at_the_base_model(backbone):
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, *backbone.x0_shape, generator=g), torch.tensor([100, 700])
    text = backbone.encode_prompt(["a", "b"])
    base = backbone.denoise(x_t, t, text)
    adapter = backbone.new_adapter((3, 16), rows="mean")
    tokens = adapter.tokens(torch.randn(2, 3, 16, generator=g))
    assert tokens.shape == (2, 4, backbone.cross_attention_dim)
    with pytest.raises(ConfigError, match="no user adapter"):
        backbone.denoise(x_t, t, text, tokens)
    backbone.install_adapter(adapter)
    try:
        assert torch.equal(backbone.denoise(x_t, t, text, tokens), base)
    finally:
        backbone.uninstall_adapter()


def test_save_reloads_exactly_and_identity_follows_the_weights(checkpoints, tmp_path):
    original = load(checkpoints["sd"])
    original.save(tmp_path / "copy")
    copy = load(str(tmp_path / "copy"))
    for a, b in zip(original.unet.state_dict().values(), copy.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ident = original.identity()
    assert set(ident) >= {"kind", "model_id", "weights_digest", "resolution"}
    assert ident["kind"] == "sd" and ident["resolution"] == RES
    assert load(checkpoints["sd"]).identity() == ident  # stable across loads
    assert copy.identity()["weights_digest"] == ident["weights_digest"]  # same bytes, other directory
    with torch.no_grad():
        next(copy.unet.parameters()).add_(1.0)
    copy.save(tmp_path / "changed")
    assert load(str(tmp_path / "changed")).identity()["weights_digest"] != ident["weights_digest"]


def test_unresolvable_hub_id_identity_uses_the_name():
    from ppd_core.models.sd import _weights_digest

    assert _weights_digest("no-such-org/no-such-model") == ("no-such-org/no-such-model@main", "main")


def test_missing_model_is_a_config_error():
    with pytest.raises(ConfigError, match="backbone.model"):
        SDBackbone(BackboneConfig(kind="sd", model=None))

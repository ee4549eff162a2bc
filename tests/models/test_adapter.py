"""The user adapter: exact base-model equivalence when off, gradients only in the adapter, null users,
and the export that diffusers' load_ip_adapter reads."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from ppd_core.config import BackboneConfig
from ppd_core.errors import ConfigError, InputError
from ppd_core.models.adapter import (
    SelfAttnProcessor,
    UserAdapter,
    UserAttnProcessor,
    UserProjection,
    cross_attention_layers,
    embedding_dropout,
)
from ppd_core.models.export import (
    CARD_NAME,
    EMBEDDINGS_NAME,
    WEIGHT_NAME,
    diffusers_state_dict,
    export_adapter,
    load_adapter,
    read_metadata,
)
from ppd_core.models.sd import SDBackbone, build_tiny_sd

EMBED_DIM = 24


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_sd")
    return {
        "epsilon": str(build_tiny_sd(root / "eps", prediction_type="epsilon")),
        "v_prediction": str(build_tiny_sd(root / "v", prediction_type="v_prediction", seed=1)),
    }


def load(checkpoint: str) -> SDBackbone:
    return SDBackbone(BackboneConfig(kind="sd", model=checkpoint, resolution=32))


@pytest.fixture(scope="module")
def backbone(checkpoints) -> SDBackbone:
    return load(checkpoints["epsilon"])


@pytest.fixture(scope="module")
def batch(backbone):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, *backbone.x0_shape, generator=g)
    t = torch.tensor([5, 250, 500, 990])
    text = backbone.encode_prompt(["a red square", "a blue circle", "", "two shapes"])
    embeddings = torch.randn(4, EMBED_DIM, generator=g)
    return x_t, t, text, embeddings


def fresh_adapter(backbone, **kw) -> UserAdapter:
    adapter = backbone.new_adapter((EMBED_DIM,), **kw)
    backbone.install_adapter(adapter)
    return adapter


def perturb(adapter: UserAdapter, seed: int = 0) -> None:
    """Training-like random change of every adapter weight, gates included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def base_output(backbone, batch) -> torch.Tensor:
    x_t, t, text, _ = batch
    backbone.uninstall_adapter()
    return backbone.denoise(x_t, t, text)


# --------------------------------------------------------------------------------------------- projection


@pytest.mark.parametrize(
    ("shape", "rows", "in_dim"),
    [((16,), "all", 16), ((3, 8), "all", 24), ((3, 8), "last", 8), ((3, 8), "mean", 8)],
)
def test_projection_reduces_rows_and_has_image_projection_layout(shape, rows, in_dim):
    proj = UserProjection(shape, num_tokens=4, cross_attention_dim=32, rows=rows)
    assert proj.in_dim == in_dim
    assert set(proj.state_dict()) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert proj(torch.randn(2, *shape)).shape == (2, 4, 32)
    with pytest.raises(InputError, match="shape"):
        proj(torch.randn(2, 5))


# --------------------------------------------------------------------------------------------- exactness


def test_fresh_adapter_is_exactly_the_base_model_for_any_user(backbone, batch):
    base = base_output(backbone, batch)
    adapter = fresh_adapter(backbone)
    x_t, t, text, embeddings = batch
    for scale in (1.0, 3.0):
        out = backbone.denoise(x_t, t, text, adapter.tokens(embeddings), scale)
        assert torch.equal(out, base)


def test_branch_off_is_exactly_the_base_model_after_training(backbone, batch):
    base = base_output(backbone, batch)
    adapter = fresh_adapter(backbone)
    perturb(adapter)
    x_t, t, text, embeddings = batch
    tokens = adapter.tokens(embeddings)
    assert not torch.allclose(backbone.denoise(x_t, t, text, tokens), base)
    assert torch.equal(backbone.denoise(x_t, t, text, tokens, 0.0), base)
    assert torch.equal(backbone.denoise(x_t, t, text, None), base)


def test_null_users_are_exactly_the_base_model_and_others_are_not(backbone, batch):
    base = base_output(backbone, batch)
    adapter = fresh_adapter(backbone)
    perturb(adapter)
    x_t, t, text, embeddings = batch
    null = torch.tensor([True, False, True, False])
    tokens, scale = adapter.condition(embeddings, scale=1.0, null=null)
    out = backbone.denoise(x_t, t, text, tokens, scale)
    for i in range(4):
        assert torch.equal(out[i], base[i]) == bool(null[i])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_installs_on_epsilon_and_v_prediction_checkpoints(checkpoints, prediction_type):
    backbone = load(checkpoints[prediction_type])
    assert backbone.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *backbone.x0_shape, generator=g)
    noise = torch.randn(2, *backbone.x0_shape, generator=g)
    t = backbone.sample_timesteps(2, g)
    x_t, text = backbone.add_noise(x0, noise, t), backbone.encode_prompt(["a", "b"])
    base = backbone.denoise(x_t, t, text)
    adapter = fresh_adapter(backbone)
    tokens = adapter.tokens(torch.randn(2, EMBED_DIM, generator=g))
    assert torch.equal(backbone.denoise(x_t, t, text, tokens), base)
    perturb(adapter)
    out = backbone.denoise(x_t, t, text, tokens)
    assert out.shape == backbone.target(x0, noise, t).shape
    assert not torch.allclose(out, base)


# --------------------------------------------------------------------------------------------- training


def test_only_adapter_parameters_train(backbone, batch):
    adapter = fresh_adapter(backbone)
    unet_ids = {id(p) for p in backbone.unet.parameters()}
    assert not unet_ids & {id(p) for p in adapter.parameters()}
    assert all(not p.requires_grad for p in backbone.unet.parameters())
    x_t, t, text, embeddings = batch

    def backward():
        adapter.zero_grad(set_to_none=True)
        backbone.denoise(x_t, t, text, adapter.tokens(embeddings)).square().mean().backward()

    backward()
    assert all(p.grad is None for p in backbone.unet.parameters())
    # a zero gate passes gradient to itself only: everything behind it gets an exactly zero gradient
    for name, p in adapter.named_parameters():
        assert p.grad is not None, name
        assert (p.grad.abs().sum() > 0) == name.endswith(".gate"), name
    perturb(adapter)
    backward()
    for name, p in adapter.named_parameters():
        assert p.grad.abs().sum() > 0, name


def test_state_dict_keys_are_stable_and_adapter_only(backbone):
    adapter = fresh_adapter(backbone)
    layers = cross_attention_layers(backbone.unet)
    assert list(layers) == list(adapter.layer_names)
    expected = {
        "projection.proj.weight",
        "projection.proj.bias",
        "projection.norm.weight",
        "projection.norm.bias",
    }
    for name in layers:
        key = name.removesuffix(".processor").replace(".", "-")
        expected |= {f"branches.{key}.to_k_u.weight", f"branches.{key}.to_v_u.weight", f"branches.{key}.gate"}
    assert set(adapter.state_dict()) == expected
    assert not any("_u." in k or "gate" in k for k in backbone.unet.state_dict())
    rebuilt = UserAdapter(**adapter.config())
    rebuilt.load_state_dict(adapter.state_dict(), strict=True)


def test_to_k_u_and_to_v_u_start_as_copies_of_the_layer(backbone):
    adapter = fresh_adapter(backbone)
    for name in adapter.layer_names:
        attn = backbone.unet.get_submodule(name.removesuffix(".processor"))
        assert torch.equal(adapter.branch(name).to_k_u.weight, attn.to_k.weight)
        assert torch.equal(adapter.branch(name).to_v_u.weight, attn.to_v.weight)
        assert adapter.branch(name).gate.item() == 0.0


def test_processors_and_no_kwarg_warnings(backbone, batch):
    adapter = fresh_adapter(backbone)
    for name, proc in backbone.unet.attn_processors.items():
        expected = UserAttnProcessor if name in adapter.layer_names else SelfAttnProcessor
        assert type(proc) is expected
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        x_t, t, text, embeddings = batch
        backbone.denoise(x_t, t, text, adapter.tokens(embeddings))
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "not expected" in r.getMessage()]


def test_embedding_dropout_is_seeded_and_near_its_rate():
    a = embedding_dropout(2000, 0.1, torch.Generator().manual_seed(3))
    b = embedding_dropout(2000, 0.1, torch.Generator().manual_seed(3))
    assert a.dtype == torch.bool and torch.equal(a, b)
    assert 0.07 < a.float().mean().item() < 0.13
    assert not embedding_dropout(100, 0.0).any()
    with pytest.raises(ConfigError):
        embedding_dropout(4, 1.0)


# --------------------------------------------------------------------------------------------- export


@pytest.fixture()
def exported(backbone, tmp_path):
    adapter = fresh_adapter(backbone)
    perturb(adapter)
    table = pa.table({"user_id": [1, 2], "embedding": [[0.5] * EMBED_DIM, [-0.5] * EMBED_DIM]})
    config = {"adapter": {"scale": 1.0, "num_tokens": 4}, "backbone": {"kind": "sd"}}
    export_adapter(adapter, backbone, tmp_path, config, table, step=12)
    return adapter, tmp_path


def test_export_layout_and_metadata(backbone, exported):
    adapter, out_dir = exported
    with safe_open(str(out_dir / WEIGHT_NAME), framework="pt") as f:
        keys = set(f.keys())
    n = len(adapter.layer_names)
    expected = {
        "image_proj.proj.weight",
        "image_proj.proj.bias",
        "image_proj.norm.weight",
        "image_proj.norm.bias",
    }
    for key_id in range(1, 2 * n, 2):
        expected |= {f"ip_adapter.{key_id}.to_k_ip.weight", f"ip_adapter.{key_id}.to_v_ip.weight"}
    assert keys == expected
    meta = read_metadata(out_dir)
    assert meta["step"] == 12 and meta["config"]["adapter"]["num_tokens"] == 4
    assert meta["adapter"]["diffusers_loadable"] and meta["backbone"] == backbone.identity()
    assert pq.read_table(out_dir / EMBEDDINGS_NAME).num_rows == 2
    card = (out_dir / CARD_NAME).read_text()
    assert "load_ip_adapter" in card and backbone.model in card and f"({EMBED_DIM},)" in card


def test_export_then_our_loader_reproduces_the_adapter(backbone, batch, exported):
    adapter, out_dir = exported
    x_t, t, text, embeddings = batch
    expected = backbone.denoise(x_t, t, text, adapter.tokens(embeddings))
    reloaded_backbone = load(backbone.model)
    reloaded = load_adapter(out_dir, reloaded_backbone)
    assert all(reloaded.branch(n).gate.item() == 1.0 for n in reloaded.layer_names)
    out = reloaded_backbone.denoise(x_t, t, text, reloaded.tokens(embeddings))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the weights themselves round-trip exactly
    again = diffusers_state_dict(reloaded)
    for key, value in diffusers_state_dict(adapter).items():
        assert torch.equal(again[key], value), key


def test_export_loads_with_diffusers_load_ip_adapter(backbone, batch, exported):
    from diffusers import StableDiffusionPipeline

    adapter, out_dir = exported
    x_t, t, text, embeddings = batch
    expected = backbone.denoise(x_t, t, text, adapter.tokens(embeddings))
    pipe = StableDiffusionPipeline.from_pretrained(
        backbone.model, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_ip_adapter(str(out_dir), subfolder="", weight_name=WEIGHT_NAME, image_encoder_folder=None)
    with torch.no_grad():
        out = pipe.unet(
            x_t, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeddings[:, None]]}
        ).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    images = pipe(
        "a red square",
        num_inference_steps=2,
        guidance_scale=1.0,
        height=32,
        width=32,
        ip_adapter_image_embeds=[embeddings[:1, None]],
        output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3)


def test_sd_export_requires_four_tokens(backbone, tmp_path):
    adapter = fresh_adapter(backbone, num_tokens=2)
    with pytest.raises(ConfigError, match="num_tokens"):
        export_adapter(adapter, backbone, tmp_path, {}, None)
    export_adapter(adapter, backbone, tmp_path, {}, None, require_diffusers=False)
    assert not read_metadata(tmp_path)["adapter"]["diffusers_loadable"]
    assert "Not loadable" in (tmp_path / CARD_NAME).read_text()


def test_sdxl_export_loads_with_diffusers_load_ip_adapter(tmp_path):
    """SDXL: the same export layout loads into StableDiffusionXLPipeline; scale 0 is the base pipeline."""
    from diffusers import StableDiffusionXLPipeline

    xl = load(str(build_tiny_sd(tmp_path / "xl", xl=True)))
    adapter = fresh_adapter(xl)
    perturb(adapter)
    export_adapter(adapter, xl, tmp_path / "export", {"adapter": {"scale": 1.0}}, None, step=1)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl.model)
    embeds = torch.randn(1, 1, EMBED_DIM, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        return pipe(
            "a red square", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np",
            generator=torch.Generator().manual_seed(0), **kw,
        ).images  # fmt: skip

    base = run()
    pipe.load_ip_adapter(
        str(tmp_path / "export"), subfolder="", weight_name=WEIGHT_NAME, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_allclose(run(ip_adapter_image_embeds=[embeds]), base, atol=1e-5)
    pipe.set_ip_adapter_scale(1.0)
    assert not np.allclose(run(ip_adapter_image_embeds=[embeds]), base, atol=1e-4)

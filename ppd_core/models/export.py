"""Export of a trained user adapter in diffusers' IP-Adapter file layout, and our loader for it.

``out_dir`` receives::

    ip_adapter.safetensors     image_proj.proj.{weight,bias}, image_proj.norm.{weight,bias},
                               ip_adapter.{1,3,5,...}.to_k_ip.weight / to_v_ip.weight
    user_embeddings.parquet    the user embeddings table, when given
    README.md                  a model card

Layer ``i`` (0-based, in ``Backbone.adapter_layers`` order: a UNet's cross-attention layers in processor
order) is saved as ``ip_adapter.{2i+1}``: the numbering ``_convert_ip_adapter_attn_to_diffusers`` reads. The branch is linear in
its values, so each layer's ``gate`` (times ``scale``) is folded into ``to_v_ip``; :func:`load_adapter` reads
the folded weights back with every gate set to 1, which computes the same function up to float rounding.

The safetensors metadata (str -> str) carries ``ppd.config`` (the resolved run config, JSON), ``ppd.step``,
``ppd.adapter`` (the adapter's constructor arguments plus ``trained_scale`` and ``folded_scale``) and
``ppd.backbone`` (the backbone identity).

diffusers only auto-detects 4 user tokens for an ``image_proj.proj.weight`` projection, so a file is loadable
with ``pipe.load_ip_adapter(out_dir, subfolder="", weight_name=WEIGHT_NAME, image_encoder_folder=None)`` only
when ``num_tokens == 4`` and the backbone is a standard UNet2DConditionModel; SD exports insist on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from ppd_core.errors import ConfigError, InputError
from ppd_core.models.adapter import UserAdapter, branch_key, cross_attention_layers
from ppd_core.models.backbone import Backbone
from ppd_core.weights import save_safetensors

WEIGHT_NAME = "ip_adapter.safetensors"
EXPORT_DIR = "export"  # inside a train stage's output


def export_dir(train_dir: str | Path) -> Path:
    """Where a train stage's output keeps its adapter export."""
    return Path(train_dir) / EXPORT_DIR


EMBEDDINGS_NAME = "user_embeddings.parquet"
CARD_NAME = "README.md"
DIFFUSERS_NUM_TOKENS = 4


def _key_id(index: int) -> int:
    """diffusers numbers cross-attention layers 1, 3, 5, ... (the odd slots of the original attn1/attn2 list)."""
    return 2 * index + 1


def diffusers_state_dict(adapter: UserAdapter, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The adapter in IP-Adapter key layout, gate * scale folded into to_v_ip (contiguous CPU float32)."""
    proj = adapter.projection
    tensors = {
        "image_proj.proj.weight": proj.proj.weight,
        "image_proj.proj.bias": proj.proj.bias,
        "image_proj.norm.weight": proj.norm.weight,
        "image_proj.norm.bias": proj.norm.bias,
    }
    for index, name in enumerate(adapter.layer_names):
        branch = adapter.branch(name)
        key = _key_id(index)
        tensors[f"ip_adapter.{key}.to_k_ip.weight"] = branch.to_k_u.weight
        tensors[f"ip_adapter.{key}.to_v_ip.weight"] = branch.to_v_u.weight * (branch.gate * scale)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def diffusers_loadable(adapter: UserAdapter, backbone: Backbone) -> str | None:
    """None if ``load_ip_adapter`` reads this adapter into the backbone's UNet as is, else the reason it does
    not (any denoiser that is not a standard ``UNet2DConditionModel``, e.g. the Stable Cascade prior)."""
    if adapter.num_tokens != DIFFUSERS_NUM_TOKENS:
        return f"num_tokens is {adapter.num_tokens}; diffusers' ImageProjection auto-detection assumes 4"
    try:
        layers = cross_attention_layers(backbone.denoiser)
    except (ConfigError, AttributeError) as e:
        return f"the denoiser is not a standard UNet2DConditionModel ({e})"
    if list(layers.items()) != list(adapter.layer_widths().items()):
        return "the adapter's layers are not the UNet's cross-attention layers in processor order"
    return None


def export_adapter(
    adapter: UserAdapter,
    backbone: Backbone,
    out_dir: str | Path,
    config: dict,
    user_embeddings: pa.Table | None = None,
    *,
    step: int = 0,
    scale: float = 1.0,
    require_diffusers: bool | None = None,
) -> Path:
    """Write the adapter (and optional embeddings table and model card) to ``out_dir``; returns the weights
    file. ``scale`` is folded into to_v_ip with the gates (the default 1.0 keeps the trained scale a runtime
    choice). ``require_diffusers`` (default: for SD backbones) makes a layout diffusers cannot read an error."""
    out_dir = Path(out_dir)
    why_not = diffusers_loadable(adapter, backbone)
    if require_diffusers is None:
        require_diffusers = backbone.kind == "sd"
    if require_diffusers and why_not:
        raise ConfigError(f"the adapter cannot be exported in a layout load_ip_adapter reads: {why_not}")
    trained_scale = float(config.get("adapter", {}).get("scale", 1.0))
    adapter_meta = {
        **adapter.config(),
        "trained_scale": trained_scale,
        "folded_scale": float(scale),
        "gates_folded": True,
        "diffusers_loadable": why_not is None,
    }
    identity = backbone.identity()
    metadata = {
        "format": "pt",
        "ppd.config": json.dumps(config, sort_keys=True, default=str),
        "ppd.step": str(int(step)),
        "ppd.adapter": json.dumps(adapter_meta, sort_keys=True),
        "ppd.backbone": json.dumps(identity, sort_keys=True, default=str),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHT_NAME
    save_safetensors(diffusers_state_dict(adapter, scale), weights, metadata)  # same weights, same bytes
    if user_embeddings is not None:
        pq.write_table(user_embeddings, out_dir / EMBEDDINGS_NAME)
    (out_dir / CARD_NAME).write_text(
        _model_card(adapter_meta, identity, step, user_embeddings is not None, why_not)
    )
    return weights


def read_metadata(path: str | Path) -> dict:
    """The safetensors metadata of an export, JSON fields decoded."""
    path = _weights_path(path)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out: dict = {k: v for k, v in raw.items() if not k.startswith("ppd.")}
    for key in ("config", "adapter", "backbone"):
        if f"ppd.{key}" in raw:
            out[key] = json.loads(raw[f"ppd.{key}"])
    if "ppd.step" in raw:
        out["step"] = int(raw["ppd.step"])
    return out


def load_adapter(path: str | Path, backbone: Backbone) -> UserAdapter:
    """Read an export (directory or weights file) back into a :class:`UserAdapter` installed on ``backbone``
    (``Backbone.install_adapter``, which refuses an adapter built for other layers).

    Weights are loaded exactly; since the gates were folded into to_v_u at export, every gate is 1, so the
    loaded adapter at ``user_scale = s`` matches the trained one at ``s * folded_scale``. A foreign IP-Adapter
    file without our metadata loads as a 4-token adapter on flat embeddings.
    """
    path = _weights_path(path)
    meta = read_metadata(path).get("adapter")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if "image_proj.proj.weight" not in tensors:
        raise InputError(f"{path}: no image_proj.proj.weight, not a 4-token IP-Adapter layout")
    if meta is None:
        proj_weight = tensors["image_proj.proj.weight"]
        meta = {
            "embedding_shape": [proj_weight.shape[1]],
            "cross_attention_dim": proj_weight.shape[0] // DIFFUSERS_NUM_TOKENS,
            "layers": list(backbone.adapter_layers().items()),
            "num_tokens": DIFFUSERS_NUM_TOKENS,
            "rows": "all",
        }
    adapter = UserAdapter(
        meta["embedding_shape"],
        meta["cross_attention_dim"],
        meta["layers"],
        num_tokens=meta["num_tokens"],
        rows=meta["rows"],
    )
    state = {
        "projection.proj.weight": tensors["image_proj.proj.weight"],
        "projection.proj.bias": tensors["image_proj.proj.bias"],
        "projection.norm.weight": tensors["image_proj.norm.weight"],
        "projection.norm.bias": tensors["image_proj.norm.bias"],
    }
    for index, name in enumerate(adapter.layer_names):
        prefix = f"branches.{branch_key(name)}"
        key = _key_id(index)
        state[f"{prefix}.to_k_u.weight"] = tensors[f"ip_adapter.{key}.to_k_ip.weight"]
        state[f"{prefix}.to_v_u.weight"] = tensors[f"ip_adapter.{key}.to_v_ip.weight"]
        state[f"{prefix}.gate"] = torch.ones(1)
    adapter.load_state_dict(state, strict=True)
    adapter.to(device=next(backbone.denoiser.parameters()).device)
    backbone.install_adapter(adapter)
    return adapter


def _weights_path(path: str | Path) -> Path:
    path = Path(path)
    path = path / WEIGHT_NAME if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"no adapter export at {path}")
    return path


def _model_card(meta: dict, identity: dict, step: int, has_embeddings: bool, why_not: str | None) -> str:
    in_dim = meta["embedding_shape"]
    flat = (
        "as is" if len(in_dim) == 1 else {"all": "flattened", "last": "its last row", "mean": "its row mean"}
    )
    if isinstance(flat, dict):
        flat = flat[meta["rows"]]
    ratio = meta["trained_scale"] / meta["folded_scale"] if meta["folded_scale"] else meta["trained_scale"]
    base = identity.get("model_id") or f"the {identity.get('kind')} backbone"
    lines = [
        "# PPD user adapter",
        "",
        "A personalised preference adapter (PPD, arXiv 2501.06655): a user embedding computed from a few of the",
        "user's labelled image pairs is projected to user tokens that a decoupled cross-attention branch",
        "(IP-Adapter style, shared query) reads in every cross-attention layer of the base model.",
        "",
        f"- base model: `{base}` ({identity.get('kind')}, {identity.get('resolution')} px, "
        f"{identity.get('prediction_type', '')})",
        f"- user embedding shape: {tuple(in_dim)} (rows: {meta['rows']}; the projection reads it {flat})",
        f"- user tokens: {meta['num_tokens']} x {meta['cross_attention_dim']}",
        f"- adapted layers: {len(meta['layers'])}",
        f"- training step: {step}; trained scale {meta['trained_scale']}, folded scale {meta['folded_scale']}",
        f"- user embeddings: {'`' + EMBEDDINGS_NAME + '`' if has_embeddings else 'not included'}",
        "",
        "## Load with diffusers",
        "",
    ]
    if why_not is None:
        lines += [
            "```python",
            "pipe.load_ip_adapter(export_dir, subfolder='', "
            f"weight_name='{WEIGHT_NAME}', image_encoder_folder=None)",
            f"pipe.set_ip_adapter_scale({ratio:g})  # reproduces the trained model",
            "# u: the user embedding, reduced as above to a vector of the projection's input width",
            "image = pipe(prompt, ip_adapter_image_embeds=[u.reshape(1, 1, -1)]).images[0]",
            "# under classifier-free guidance diffusers wants the negative half first: torch.cat([u_neg, u])",
            "```",
        ]
    else:
        lines += [f"Not loadable by `load_ip_adapter`: {why_not}."]
    lines += [
        "",
        "## Load with ppd_core",
        "",
        "```python",
        "from ppd_core.models.export import load_adapter",
        "adapter = load_adapter(export_dir, backbone.denoiser)  # installs the processors; gates are 1",
        "tokens, scale = adapter.condition(embeddings, scale=...)",
        "prediction = backbone.denoise(x_t, t, text, tokens, scale)",
        "```",
        "",
    ]
    return "\n".join(lines)

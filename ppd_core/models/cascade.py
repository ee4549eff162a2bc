"""The Stable Cascade backbone: the Stage-C prior behind :class:`Backbone`, and its user branch.

The paper's backbone (the paper; the Diffusion-DPO conventions). Stage C is a text-conditional
``StableCascadeUNet`` over 16-channel EfficientNet latents, 24x24 for 1024 px (side = ceil(resolution /
42.67), ``resolution_multiple`` in ``model_index.json``). Stages B/A (the decoder) stay untouched and are
only used to look at samples. Checkpoint layout, the one ``stabilityai/stable-cascade-prior`` has::

    model_index.json    the StableCascadePriorPipeline components (resolution_multiple 42.67)
    prior/              StableCascadeUNet (the hub repo also has prior_lite/, the 1B variant)
    text_encoder/       CLIPTextModelWithProjection (ViT-bigG/14: hidden 1280, projection 1280)
    tokenizer/          CLIPTokenizer (77 tokens)
    scheduler/          DDPMWuerstchenScheduler (cosine schedule, s = 0.008)
    backbone.json       ours, written by :meth:`CascadeBackbone.save` only: kind and resolution

Contracts:

- **x0** is the Stage-C latent (B, 16, side, side): the Stable Cascade EfficientNet encoder's output as
  ``train/train_c.py`` of Stability-AI/StableCascade computes it (BatchNorm-normalised, no Wuerstchen
  ``(x+1)/42`` scaling; the paper), from images at 32 * side px (768 for 1024). diffusers does not
  ship that encoder: :mod:`ppd_core.models.effnet` does, and :meth:`~CascadeBackbone.encode_images` loads it
  on first use from ``effnet`` (config ``backbone.effnet``; default: ``effnet_encoder.safetensors`` in a
  local model directory, else the official ``stabilityai/stable-cascade`` file).
- **Text** (``encode_prompt``): (B, 77 + 1, text_dim) = the text encoder's last-layer hidden states
  (``hidden_states[-1]``, before the final LayerNorm, as StableCascadePriorPipeline feeds ``clip_text``)
  with the pooled, projected ``text_embeds`` appended as token 78. ``denoise`` splits the last token off
  again as ``clip_text_pooled`` (B, 1, text_dim). One tensor thus carries both, and batches, caches and
  CFG concatenation treat it like any other backbone's text. ``clip_img`` is always zeros (no image prompt).
- **Schedule**: t is the timestep *ratio* in [0, 1] (float), drawn U(0, 1) for training; alpha_bar(t) =
  cos((t+s)/(1+s) pi/2)^2 / cos(s/(1+s) pi/2)^2 clamped to [1e-4, 0.9999], s = 0.008 (the
  DDPMWuerstchenScheduler's formula and the cosine schedule of train_c.py's GDF); the prior predicts the
  noise (``prediction_type`` "epsilon"). The prior gets t itself, as in StableCascadePriorPipeline; train_c.py
  feeds the ratio recovered from the clamped alpha_bar, which differs only where the clamp bites (t above
  ~0.994, and t close to 0).
- **User tokens** live in the prior's conditioning space: ``cross_attention_dim`` is ``conditioning_dim``
  (2048), which differs from the text width (1280) that ``encode_prompt`` returns.

User branch (the paper). ``SDCascadeAttnBlock`` attends jointly over [normed image tokens |
mapped text tokens] and its forward takes no extra arguments, but its inner diffusers ``Attention`` has a
processor slot. ``install_adapter`` (:func:`install_cascade_user_branch`) puts a :class:`CascadeUserProcessor` there: the stock
processor's output plus ``user_scale * gate * to_out.W @ SDPA(to_q(norm x), K_u, V_u)`` (to_out's matrix
without its bias, so the sum equals IP-Adapter's "add before to_out"), with ``K_u = to_k_u(SiLU(u))``,
``V_u = to_v_u(SiLU(u))``. User tokens reach the processors as module state set by
:func:`cascade_user_tokens` (``denoise`` opens it around the prior call). The adapter is the same
``UserAdapter`` every backbone uses (``Backbone.new_adapter``), one ``UserBranch`` per attention block keyed
by the block's module name, so training, export and generation treat Cascade like any backbone. Its
weights live only in the adapter; processors are plain objects, so the prior's ``state_dict``/``parameters``
never see them. Tokens None, a scale of 0 or gates at 0 give the base model
exactly, and so does an all-zero user token (SiLU(0) = 0 and bias-free projections give zero values).
Wrapping the block itself would not work: the UNet dispatches on ``isinstance(block, SDCascadeAttnBlock)``
and calls anything else without the text conditioning. Gradient checkpointing on the prior is refused while
user tokens are set (its backward-time recomputation would run after the tokens were cleared).

diffusers pin (0.42.1, pyproject): StableCascadePriorPipeline / StableCascadeDecoderPipeline are
deprecated after 0.35.2 (``DeprecatedPipelineMixin``: a warning, no fixes). This module relies on them
only for :meth:`~CascadeBackbone.decode` (Stages B/A, with ``PaellaVQModel`` imported from
``diffusers.pipelines.deprecated.wuerstchen``; see :func:`load_cascade_decoder`). Everything else uses classes that are not
deprecated in 0.42.1: ``StableCascadeUNet`` (and its ``SDCascadeAttnBlock`` layout: ``attention``,
``kv_mapper``, the ``isinstance`` dispatch in ``_down_encode``/``_up_decode``), ``Attention.set_processor``,
``AttnProcessor2_0`` and ``DDPMWuerstchenScheduler``; ``model_index.json`` is written by hand in the
pipeline's format so the saved directory still loads with ``StableCascadePriorPipeline.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMWuerstchenScheduler, DiffusionPipeline, StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from ppd_core.config import BackboneConfig
from ppd_core.errors import ConfigError, InputError, PPDError, StageError
from ppd_core.models.adapter import UserAdapter, UserBranch
from ppd_core.models.backbone import Backbone
from ppd_core.models.effnet import (
    DOWNSCALE,
    EFFNET_FILE,
    default_effnet,
    effnet_preprocess,
    load_effnet,
    resolve_effnet_file,
    save_tiny_effnet,
)
from ppd_core.models.text import BOS_ID, CLIP_MAX_LENGTH, EOS_ID, VOCAB_SIZE, build_offline_clip_tokenizer
from ppd_core.models.toy import state_digest

KIND = "cascade"
BACKBONE_FILE = "backbone.json"
MODEL_INDEX = "model_index.json"
PRIOR_SUBFOLDERS = ("prior", "prior_lite")
RESOLUTION_MULTIPLE = 42.67  # StableCascadePriorPipeline's default: 1024 px -> 24x24 latents
DEFAULT_RESOLUTION = 1024
DECODER_STEPS = 10  # Stable Cascade's decoder defaults (the paper): 10 steps, no CFG
TINY_RESOLUTION = 336  # ceil(336 / 42.67) = 8: 8x8 latents for the tiny test checkpoint
FORMAT_VERSION = 1
DECODER_SUBDIR = "decoder_pipeline"  # Stages B/A shipped inside a local prior directory (the tiny checkpoint)
DECODER_HUB = "stabilityai/stable-cascade"


def default_decoder(model: str | Path) -> str | None:
    """Where Stages B/A come from when the config names none: ``decoder_pipeline/`` inside a local model
    directory when there is one, else the official decoder for a hub prior; None for a local prior without one
    (decoding then asks for ``backbone.decoder``)."""
    local = Path(model)
    if (local / DECODER_SUBDIR / MODEL_INDEX).is_file():
        return str(local / DECODER_SUBDIR)
    return None if local.exists() else DECODER_HUB


class CascadeUnsupportedError(PPDError, NotImplementedError):
    """A Stable Cascade operation that needs a model diffusers does not provide, or that was not given."""


# ------------------------------------------------------------------------------------------ user branch


def cascade_branch_output(
    branch: UserBranch,
    attn,
    hidden_states: torch.Tensor,
    user_tokens: torch.Tensor,
    user_scale: float | torch.Tensor,
) -> torch.Tensor:
    """The term one Stage-C attention block adds to its stock attention output for the user tokens.

    ``branch`` is the adapter's ``UserBranch`` of that block (``to_k_u`` / ``to_v_u``: conditioning_dim ->
    block width, bias-free, reading ``SiLU(user_tokens)``; ``gate``); ``hidden_states`` is what the block's
    attention gets as its query input: the normed image tokens (B, C, H, W).
    """
    spatial = hidden_states.ndim == 4
    if spatial:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, L, C)
    batch = hidden_states.shape[0]
    if user_tokens.shape[0] != batch:
        raise InputError(f"user_tokens has batch {user_tokens.shape[0]}, the latents have {batch}")
    query = attn.to_q(hidden_states)  # (B, L, inner): the block's own query
    inner, heads = query.shape[-1], attn.heads
    # the block's kv_mapper starts with the same SiLU; fp32 branch weights may sit over a bf16 prior
    u = F.silu(user_tokens.to(branch.to_k_u.weight.dtype))  # (B, N, D)
    key = branch.to_k_u(u).to(query.dtype)  # (B, N, inner)
    value = branch.to_v_u(u).to(query.dtype)
    query, key, value = (
        x.view(batch, -1, heads, inner // heads).transpose(1, 2) for x in (query, key, value)
    )
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # (B, h, L, d)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, inner)  # (B, L, inner)
    out = F.linear(out, attn.to_out[0].weight)  # no bias: the stock output already carries it
    out = branch.factor(user_scale, out) * out / attn.rescale_output_factor
    if spatial:
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
    return out


class CascadeUserProcessor:
    """Attention processor of one ``SDCascadeAttnBlock``: the stock processor, plus the user branch while
    :func:`cascade_user_tokens` has set tokens. A plain object, so the prior's state_dict stays the base one."""

    def __init__(self, base, branch: UserBranch):
        self.base = base  # the processor it replaced (AttnProcessor2_0): restored by uninstall
        self.branch = branch
        self.user_tokens: torch.Tensor | None = None
        self.user_scale: float | torch.Tensor = 1.0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)  # the base model
        scale = self.user_scale
        if self.user_tokens is None or (not torch.is_tensor(scale) and scale == 0):
            return out
        return out + cascade_branch_output(self.branch, attn, hidden_states, self.user_tokens, scale).to(
            out.dtype
        )


def cascade_attention_blocks(unet: StableCascadeUNet) -> dict[str, SDCascadeAttnBlock]:
    """Module name -> attention block, in module order (down_blocks then up_blocks)."""
    blocks = {name: m for name, m in unet.named_modules() if isinstance(m, SDCascadeAttnBlock)}
    if not blocks:
        raise ConfigError(
            "the denoiser has no SDCascadeAttnBlock to carry user tokens (not a StableCascadeUNet?)"
        )
    return blocks


def cascade_initial_weights(block: SDCascadeAttnBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh branch's ``to_k_u`` / ``to_v_u``: ``to_k.W @ kv_mapper.W`` (same for v), float32: the block's
    own key/value map of a conditioning token without its biases. For keys a constant bias shifts every logit
    of a query equally, so K_u matches the block's keys exactly up to softmax; dropping the value bias keeps
    an all-zero token a no-op."""
    mapper, attn = block.kv_mapper[1], block.attention
    return (
        attn.to_k.weight.float() @ mapper.weight.float(),
        attn.to_v.weight.float() @ mapper.weight.float(),
    )


def _user_processors(unet: StableCascadeUNet) -> list[CascadeUserProcessor]:
    procs = [b.attention.processor for b in cascade_attention_blocks(unet).values()]
    return [p for p in procs if isinstance(p, CascadeUserProcessor)]


def install_cascade_user_branch(unet: StableCascadeUNet, adapter: UserAdapter) -> None:
    """Put a :class:`CascadeUserProcessor` carrying ``adapter``'s branch on every Stage-C attention block
    (installing again replaces the previous adapter). The adapter must have been built for this prior:
    one branch per block (layer names = block module names) and user tokens as wide as the prior's
    ``conditioning_dim``, what the blocks' kv_mapper reads."""
    blocks = cascade_attention_blocks(unet)
    cond_dim = next(iter(blocks.values())).kv_mapper[1].in_features
    if adapter.cross_attention_dim != cond_dim:
        raise ConfigError(
            f"user tokens are {adapter.cross_attention_dim} wide; Stage-C attention reads {cond_dim}-wide "
            "conditioning tokens (the prior's conditioning_dim)"
        )
    if sorted(adapter.layer_names) != sorted(blocks):
        raise ConfigError("the user adapter was built for a prior with other attention blocks")
    for name, block in blocks.items():
        attn, branch = block.attention, adapter.branch(name)
        if branch.to_k_u.out_features != attn.to_k.out_features:
            raise ConfigError(f"{name}: the user branch does not match the block's width")
        base = attn.processor.base if isinstance(attn.processor, CascadeUserProcessor) else attn.processor
        attn.set_processor(CascadeUserProcessor(base, branch))


def uninstall_cascade_user_branch(unet: StableCascadeUNet) -> None:
    """Back to the processors that were there before :func:`install_cascade_user_branch`."""
    for block in cascade_attention_blocks(unet).values():
        if isinstance(block.attention.processor, CascadeUserProcessor):
            block.attention.set_processor(block.attention.processor.base)


@contextlib.contextmanager
def cascade_user_tokens(
    unet: StableCascadeUNet,
    user_tokens: torch.Tensor | None,
    user_scale: float | torch.Tensor = 1.0,
) -> Iterator[None]:
    """Deliver ``user_tokens`` (B, N, cross_dim) and ``user_scale`` (float or (B,)) to every installed
    branch for the duration of the block, then clear them (also on error).

    Gradient checkpointing re-runs blocks during backward, after this block has cleared the tokens, so it
    is refused while tokens are set and gradients are on.
    """
    procs = _user_processors(unet)
    if user_tokens is not None:
        if not procs:
            raise RuntimeError(
                "denoise got user_tokens, but no user adapter is installed on the Stable Cascade prior "
                "(call install_adapter first)"
            )
        if getattr(unet, "gradient_checkpointing", False) and torch.is_grad_enabled():
            raise RuntimeError(
                "the Cascade user branch reads its tokens from module state, which backward-time "
                "recomputation would not see: disable gradient checkpointing on the prior"
            )
    for p in procs:
        p.user_tokens, p.user_scale = user_tokens, user_scale
    try:
        yield
    finally:
        for p in procs:
            p.user_tokens, p.user_scale = None, 1.0


# ------------------------------------------------------------------------------------------ sampling


class CascadeSamplingScheduler(DDPMWuerstchenScheduler):
    """DDPMWuerstchenScheduler fitted to the :class:`Backbone` sampler loop
    ``for t in sched.timesteps: x = sched.step(denoise(x, t, ...), t, x).prev_sample``.

    ``set_timesteps(n)`` keeps the n + 1 ratios 1 ... 0 as ``grid`` and exposes the first n as
    ``timesteps`` (the prior is never called at t = 0, as in StableCascadePriorPipeline); ``step`` accepts a
    scalar t and, when given no generator, draws its noise from ``self.generator`` (None: the global RNG;
    :meth:`CascadeBackbone.inference_scheduler` sets one).
    The update is DDPMWuerstchenScheduler's own (stochastic, like the pipeline's).
    """

    generator: torch.Generator | None = None

    def set_timesteps(self, num_inference_steps=None, timesteps=None, device=None) -> None:
        super().set_timesteps(num_inference_steps, timesteps, device)
        self.grid = self.timesteps  # (n + 1,) ratios, descending to 0
        self.timesteps = self.grid[:-1]

    def previous_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        index = (self.grid - timestep[0].to(self.grid.device)).abs().argmin().item()
        return self.grid[index + 1][None].expand(timestep.shape[0]).to(timestep.device)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t  # (B,)
        return super().step(
            model_output, t, sample, generator if generator is not None else self.generator, return_dict
        )


def load_cascade_decoder(
    model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Stages B/A as a StableCascadeDecoderPipeline, built from its components (``decoder/``, ``vqgan/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/`` of ``stabilityai/stable-cascade``'s layout).

    Not ``StableCascadeDecoderPipeline.from_pretrained``: in diffusers 0.42.1 ``PaellaVQModel`` lives under
    ``pipelines.deprecated.wuerstchen``, and the pipeline loader resolves its ``model_index.json`` entry neither
    as ``["wuerstchen", "PaellaVQModel"]`` (ValueError: not a loadable library) nor as ``["diffusers",
    "PaellaVQModel"]``, which ``save_pretrained`` writes (AttributeError), not even with ``vqgan=`` passed in.
    """
    from diffusers import StableCascadeDecoderPipeline  # deprecated after 0.35.2: see the module docstring
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    try:
        index = DiffusionPipeline.load_config(str(model))
        pipe = StableCascadeDecoderPipeline(
            decoder=StableCascadeUNet.from_pretrained(model, subfolder="decoder", torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder", dtype=dtype
            ),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(model, subfolder="scheduler"),
            vqgan=PaellaVQModel.from_pretrained(model, subfolder="vqgan", torch_dtype=dtype),
            latent_dim_scale=index.get("latent_dim_scale", 10.67),
        )
    except (OSError, ValueError) as e:
        raise StageError(
            f"{model}: not a Stable Cascade decoder checkpoint ({type(e).__name__}: {e})"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ------------------------------------------------------------------------------------------ backbone


class CascadeBackbone(Backbone):
    """The Stable Cascade prior (Stage C) behind the :class:`Backbone` interface; see the module docstring."""

    kind = KIND
    prediction_type = "epsilon"  # the prior predicts the noise (train_c.py: epsilon target)

    def __init__(
        self,
        prior: StableCascadeUNet,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMWuerstchenScheduler,
        resolution: int = DEFAULT_RESOLUTION,
        *,
        model_id: str = KIND,
        resolution_multiple: float = RESOLUTION_MULTIPLE,
        decoder_model: str | Path | None = None,
        effnet: str | Path | None = None,
    ) -> None:
        cfg = prior.config
        if cfg.clip_text_in_channels is None or cfg.clip_image_in_channels is None:
            raise StageError(
                f"{model_id}: the StableCascadeUNet has no text/image conditioning inputs; it is not a Stage-C "
                "prior (a Stage-B decoder?)"
            )
        text_width, pooled_width = text_encoder.config.hidden_size, text_encoder.config.projection_dim
        if not text_width == pooled_width == cfg.clip_text_in_channels == cfg.clip_text_pooled_in_channels:
            raise StageError(
                f"{model_id}: text encoder width {text_width} / projection {pooled_width} do not match the prior's "
                f"clip_text_in_channels {cfg.clip_text_in_channels} / pooled {cfg.clip_text_pooled_in_channels}"
            )
        self.prior = prior
        self.denoiser = prior
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.resolution = int(resolution)
        self.model_id = str(model_id)
        self.resolution_multiple = float(resolution_multiple)
        self.decoder_model = str(decoder_model) if decoder_model is not None else default_decoder(model_id)
        self._decoder = None  # StableCascadeDecoderPipeline, loaded on first decode
        self.effnet = str(effnet) if effnet is not None else default_effnet(model_id)  # file or hub path
        self._effnet = None  # EfficientNetEncoder, loaded on first encode_images
        self._weights_digest: str | None = None  # of the base weights; computed once, on demand

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        resolution: int | None = None,
        prior_subfolder: str = "prior",
        variant: str | None = None,
        decoder_model: str | Path | None = None,
        effnet: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> CascadeBackbone:
        """Hub id or local directory in the ``stabilityai/stable-cascade-prior`` layout -> a frozen backbone in
        eval mode (dropout off: the prior's config has 0.1). ``prior_subfolder`` "prior_lite" picks the 1B
        prior; ``variant`` e.g. "bf16" picks the hub's half-size weight files. ``resolution``: None reads
        ``backbone.json`` when there is one, else 1024. Weights are read in ``dtype`` directly. ``effnet``: the
        Stage-C image encoder (see :mod:`ppd_core.models.effnet`), read on first :meth:`encode_images`."""
        if prior_subfolder not in PRIOR_SUBFOLDERS:
            raise ConfigError(f"prior_subfolder must be one of {PRIOR_SUBFOLDERS}, got {prior_subfolder!r}")
        local = Path(model)
        meta = {}
        if (local / BACKBONE_FILE).is_file():
            meta = json.loads((local / BACKBONE_FILE).read_text())
            if meta.get("kind") != KIND:
                raise StageError(f"{model}: backbone kind {meta.get('kind')!r}, expected {KIND!r}")
        try:
            index = DiffusionPipeline.load_config(str(model))
            prior = StableCascadeUNet.from_pretrained(
                model, subfolder=prior_subfolder, variant=variant, torch_dtype=dtype
            )
            text_encoder = CLIPTextModelWithProjection.from_pretrained(
                model,
                subfolder="text_encoder",
                variant=variant,
                dtype=dtype,  # transformers 5: dtype=
            )
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            scheduler = DDPMWuerstchenScheduler.from_pretrained(model, subfolder="scheduler")
        except (OSError, ValueError) as e:
            raise StageError(
                f"{model}: not a Stable Cascade prior checkpoint ({type(e).__name__}: {e})"
            ) from None
        for net in (prior, text_encoder):
            net.to(device=device).eval().requires_grad_(False)
        return cls(
            prior,
            text_encoder,
            tokenizer,
            scheduler,
            resolution or meta.get("resolution", DEFAULT_RESOLUTION),
            model_id=str(model),
            resolution_multiple=index.get("resolution_multiple", RESOLUTION_MULTIPLE),
            decoder_model=decoder_model,
            effnet=effnet,
        )

    @classmethod
    def from_config(cls, cfg: BackboneConfig, device: str | torch.device = "cpu") -> CascadeBackbone:
        """:meth:`load` from the ``backbone`` config section (model, resolution, dtype, effnet, decoder)."""
        if cfg.kind != KIND or not cfg.model:
            raise ConfigError(f"backbone.kind={cfg.kind}, model={cfg.model!r}: not a cascade backbone config")
        if cfg.prediction_type not in ("auto", "epsilon"):
            raise ConfigError(f"the Stable Cascade prior predicts epsilon, not {cfg.prediction_type}")
        dtype = getattr(torch, cfg.dtype)
        return cls.load(
            cfg.model,
            resolution=cfg.resolution,
            decoder_model=cfg.decoder,
            effnet=cfg.effnet,
            device=device,
            dtype=dtype,
        )

    # ----------------------------------------------------------------------------- user adapter

    def adapter_layers(self) -> dict[str, int]:
        """Every Stage-C attention block (module name -> width), in module order."""
        return {
            name: b.attention.to_k.out_features for name, b in cascade_attention_blocks(self.prior).items()
        }

    def adapter_initial_weights(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        return cascade_initial_weights(cascade_attention_blocks(self.prior)[layer])

    def install_adapter(self, adapter: UserAdapter) -> None:
        install_cascade_user_branch(self.prior, adapter)

    def uninstall_adapter(self) -> None:
        uninstall_cascade_user_branch(self.prior)

    def networks(self) -> dict[str, nn.Module]:
        """The modules with weights, by component name."""
        return {"prior": self.prior, "text_encoder": self.text_encoder}

    def save(self, directory) -> None:
        """Write the prior pipeline layout with each component's ``save_pretrained`` (the prior always into
        ``prior/``, as the pipeline reads it), ``model_index.json`` and ``backbone.json``, plus a copy of a local
        EfficientNet encoder file (a hub one is fetched again). Base weights only: installed user branches are
        not part of the prior's state_dict (export them separately)."""
        import diffusers
        import transformers

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.prior.save_pretrained(directory / "prior")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.scheduler.save_pretrained(directory / "scheduler")
        index = {
            "_class_name": "StableCascadePriorPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "prior": ["diffusers", "StableCascadeUNet"],
            "resolution_multiple": self.resolution_multiple,
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
        }
        (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        meta = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "weights_digest": self.identity()["weights_digest"],
            "transformers_version": transformers.__version__,
        }
        (directory / BACKBONE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if Path(self.effnet).exists():  # a local encoder travels with the checkpoint
            src, dest = resolve_effnet_file(self.effnet), directory / EFFNET_FILE
            if not (dest.exists() and dest.samefile(src)):
                shutil.copyfile(src, dest)

    # -------------------------------------------------------------------------------- interface

    @property
    def device(self) -> torch.device:
        return self.prior.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        side = math.ceil(self.resolution / self.resolution_multiple)  # as StableCascadePriorPipeline
        return (int(self.prior.config.in_channels), side, side)

    @property
    def cross_attention_dim(self) -> int:
        """User-token width: the prior's ``conditioning_dim`` (what its attention blocks' kv_mapper reads)."""
        return int(self.prior.config.conditioning_dim)

    @property
    def text_dim(self) -> int:
        """Width of ``encode_prompt``'s tokens (CLIP bigG: 1280)."""
        return int(self.prior.config.clip_text_in_channels)

    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        """(B, 77 + 1, text_dim): ``hidden_states[-1]`` of the text encoder, then the pooled ``text_embeds``
        as one extra token (split off again by :meth:`denoise`). "" is the unconditional prompt."""
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        out = self.text_encoder(
            tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.to(device),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]  # (B, 77, C): pre-final-LayerNorm, what the prior was trained on
        pooled = out.text_embeds.unsqueeze(1)  # (B, 1, C)
        return torch.cat([hidden, pooled.to(hidden.dtype)], dim=1)  # (B, 78, C)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> x0 (B, 16, side, side) float32: Stable Cascade's
        EfficientNet encoder on the centre-cropped image resized to 32 * side px (768 at 1024), unscaled, as
        train_c.py. The encoder runs in float32 whatever the prior's dtype (train_c.py keeps it out of bf16
        autocast) and is deterministic: ``generator`` is unused."""
        if self._effnet is None:
            self._effnet = load_effnet(self.effnet, device=self.device)
        side = self.x0_shape[-1]
        x = effnet_preprocess(images, DOWNSCALE * side).to(self.device)  # (B, 3, 32 side, 32 side)
        return self._effnet(x)  # (B, 16, side, side)

    def decode(
        self,
        x0: torch.Tensor,
        captions: list[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Stage-C latents -> images (B, 3, H, W) in [0, 1] through Stages B/A (StableCascadeDecoderPipeline
        from ``decoder_model``, e.g. "stabilityai/stable-cascade": 10 steps, no CFG). Stage B is conditioned
        on ``captions`` (default ""); its noise comes from ``generator`` (default: seeded 0, reproducible)."""
        if self.decoder_model is None:
            raise CascadeUnsupportedError(
                f"{self.model_id} has no Stages B/A to decode Stage-C latents into images: set backbone.decoder "
                f"(a hub id such as {DECODER_HUB!r} or a local directory in its decoder layout)"
            )
        if self._decoder is None:
            self._decoder = load_cascade_decoder(self.decoder_model, device=self.device, dtype=self.dtype)
        captions = [""] * x0.shape[0] if captions is None else list(captions)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(0)
        images = self._decoder(
            image_embeddings=x0.to(device=self.device, dtype=self.dtype),
            prompt=captions,
            num_inference_steps=DECODER_STEPS,
            guidance_scale=0.0,
            generator=generator,
            output_type="pt",
        ).images
        return images.float().clamp(0.0, 1.0)  # (B, 3, H, W)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Timestep ratios (n,) float32 ~ U(0, 1), drawn on the generator's device."""
        device = generator.device if generator is not None else "cpu"
        return torch.rand(n, generator=generator, device=device).to(self.device)

    def _ratios(self, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1)
        return t.expand(batch) if t.numel() == 1 else t  # (B,)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """sqrt(alpha_bar(t)) x0 + sqrt(1 - alpha_bar(t)) noise (DDPMWuerstchenScheduler.add_noise)."""
        return self.scheduler.add_noise(x0, noise, self._ratios(t, x0.shape[0], x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise  # epsilon prediction

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        user_tokens: torch.Tensor | None = None,
        user_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """Predicted noise (B, 16, h, w) in ``x_t``'s dtype. ``t``: ratios (B,) or one scalar; ``text``: the
        :meth:`encode_prompt` tensor (B, 78, text_dim); ``user_tokens`` (B, N, cross_attention_dim) need
        an installed adapter (:meth:`install_adapter`); ``user_scale`` a float or (B,) per-sample scales."""
        batch, dtype = x_t.shape[0], self.dtype
        if text.ndim != 3 or text.shape[0] != batch or text.shape[1] < 2 or text.shape[2] != self.text_dim:
            raise InputError(
                f"text must be encode_prompt's (B={batch}, T+1, {self.text_dim}) tensor, got {tuple(text.shape)}"
            )
        text = text.to(dtype)
        clip_text, clip_text_pooled = text[:, :-1], text[:, -1:]  # (B, 77, C), (B, 1, C)
        image_width = self.prior.config.clip_image_in_channels
        clip_img = x_t.new_zeros(batch, 1, image_width, dtype=dtype)  # (B, 1, 768): no image prompt
        ratio = self._ratios(t, batch, x_t.device).to(dtype)
        with cascade_user_tokens(self.prior, user_tokens, user_scale):
            out = self.prior(
                sample=x_t.to(dtype),
                timestep_ratio=ratio,
                clip_text_pooled=clip_text_pooled,
                clip_text=clip_text,
                clip_img=clip_img,
            ).sample
        return out.to(x_t.dtype)

    def inference_scheduler(
        self, steps: int, generator: torch.Generator | None = None
    ) -> CascadeSamplingScheduler:
        """:class:`CascadeSamplingScheduler` with ``set_timesteps(steps)`` called (ratios on the CPU; the
        Stable Cascade default is 20 steps, CFG 4). ``generator`` feeds the stochastic steps; by default a
        fresh CPU generator seeded 0, so a sampler loop that seeds only its initial noise is reproducible."""
        sched = CascadeSamplingScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        sched.generator = torch.Generator().manual_seed(0) if generator is None else generator
        return sched

    def identity(self) -> dict:
        """``weights_digest``: :func:`~ppd_core.models.toy.state_digest` of the prior and text encoder as
        loaded (dtype included), computed once."""
        if self._weights_digest is None:
            self._weights_digest = state_digest(self.networks())
        return {
            "kind": KIND,
            "model_id": self.model_id,
            "weights_digest": self._weights_digest,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "x0_shape": list(self.x0_shape),
        }


# ------------------------------------------------------------------------------------------ tiny checkpoint


def tiny_prior(seed: int = 0) -> StableCascadeUNet:
    """A random Stage-C prior with the real prior's structure at toy widths: two levels with
    Res/Timestep/Attn blocks, self-attention, no spatial down-sampling (switch_level False), dropout 0.1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StableCascadeUNet(
            in_channels=16,
            out_channels=16,
            timestep_ratio_embedding_dim=64,
            conditioning_dim=32,
            block_out_channels=(32, 64),
            num_attention_heads=(2, 4),
            down_num_layers_per_block=(1, 1),
            up_num_layers_per_block=(1, 1),
            down_blocks_repeat_mappers=(1, 1),
            up_blocks_repeat_mappers=(1, 1),
            clip_text_in_channels=32,
            clip_text_pooled_in_channels=32,
            clip_image_in_channels=16,
            clip_seq=4,
            dropout=(0.1, 0.1),
            self_attn=True,
            switch_level=(False,),
        )


def tiny_text_encoder(seed: int = 0, width: int = 32) -> CLIPTextModelWithProjection:
    """A random 2-layer CLIP text encoder with projection (hidden = projection = ``width``), CLIP's vocabulary."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(config)


def build_tiny_cascade_decoder(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Stages B/A pipeline directory (an effnet-conditioned StableCascadeUNet and a PaellaVQModel)
    in ``StableCascadeDecoderPipeline``'s layout, which :func:`load_cascade_decoder` reads; 32 px images from
    the tiny prior's 8x8 latents."""
    import warnings

    from diffusers import StableCascadeDecoderPipeline  # deprecated after 0.35.2: see the module docstring
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = StableCascadeUNet(
            in_channels=4,
            out_channels=4,
            conditioning_dim=32,
            block_out_channels=(16, 32),
            num_attention_heads=(1, 2),
            down_num_layers_per_block=(1, 1),
            up_num_layers_per_block=(1, 1),
            block_types_per_layer=(
                ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
            ),
            clip_text_pooled_in_channels=32,
            effnet_in_channels=16,
            pixel_mapper_in_channels=3,
            timestep_conditioning_type=("sca",),
            dropout=(0.0, 0.0),
        )
        vqgan = PaellaVQModel(
            levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=16
        )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_offline_clip_tokenizer(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of the pipeline class
        pipe = StableCascadeDecoderPipeline(
            decoder=decoder,
            tokenizer=tokenizer,
            text_encoder=tiny_text_encoder(seed + 1),
            scheduler=DDPMWuerstchenScheduler(),
            vqgan=vqgan,
            latent_dim_scale=1.0,
        )
        pipe.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_cascade(out_dir: str | Path, seed: int = 0, decoder: bool = True) -> Path:
    """Write a tiny random prior checkpoint in the real ``stable-cascade-prior`` layout (plus backbone.json
    at :data:`TINY_RESOLUTION`, i.e. 16 x 8 x 8 latents, and a random EfficientNet encoder file,
    :func:`~ppd_core.models.effnet.save_tiny_effnet`, which ``load`` picks up as the default ``effnet``);
    :meth:`CascadeBackbone.load` reads it through the same ``from_pretrained`` calls as the hub checkpoint.
    ``decoder``: also a tiny Stages B/A pipeline in ``decoder_pipeline/`` (:func:`build_tiny_cascade_decoder`),
    the default decoder of a local directory, so the tiny checkpoint samples images end to end.
    Same seed, same weights."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_offline_clip_tokenizer(tmp)
    backbone = CascadeBackbone(
        tiny_prior(seed),
        tiny_text_encoder(seed),
        tokenizer,
        DDPMWuerstchenScheduler(),
        TINY_RESOLUTION,
        model_id="tiny-cascade",
    )
    backbone.save(out_dir)
    save_tiny_effnet(out_dir / EFFNET_FILE, seed)
    if decoder:
        build_tiny_cascade_decoder(out_dir / DECODER_SUBDIR, seed)
    return out_dir

"""The user adapter: user embedding -> N user tokens, read by a decoupled cross-attention branch.

the paper (IP-Adapter style, shared query)::

    Z' = Attn(q, K_text, V_text) + user_scale * gate * Attn(q, K_u, V_u),   K_u = u W'_k,  V_u = u W'_v

- :class:`UserProjection` maps an embedding to N tokens with diffusers' ``ImageProjection`` layout
  (``proj`` Linear -> reshape -> ``norm`` LayerNorm), so an SD export loads with ``load_ip_adapter``.
- :class:`UserBranch` holds one cross-attention layer's new ``to_k_u`` / ``to_v_u`` (bias-free, copied from the
  layer's ``to_k`` / ``to_v``, IP-Adapter practice) and a scalar ``gate`` initialised at 0, so a fresh adapter
  is exactly the base model (the first DPO loss is exactly ln 2).
- :class:`UserAttnProcessor` (``attn2``) adds the branch to the stock text attention; :class:`SelfAttnProcessor`
  (``attn1``) is the stock processor that accepts and drops ``user_tokens`` / ``user_scale``, so diffusers does
  not warn about unexpected cross_attention_kwargs.

The processors are plain objects, not modules: the branch weights live only in :class:`UserAdapter` (keys
``projection.*`` and ``branches.<layer>.*``), so ``unet.state_dict()`` and ``unet.parameters()`` never see them
and ``adapter.parameters()`` are only the adapter's. Move the adapter with ``adapter.to(device)``.

No user tokens, a scale of 0, or a null user skips (or zeroes) the branch, so the output equals the base
model exactly. The DPO reference is therefore the same network called without user tokens: never a copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from ppd_core.errors import ConfigError, InputError

Rows = Literal["all", "last", "mean"]
ROWS: tuple[str, ...] = ("all", "last", "mean")
_PROCESSOR_SUFFIX = ".processor"


def reduced_dim(embedding_shape: Sequence[int], rows: str) -> int:
    """Input width of the projection: a (D,) embedding is used as is; (R, D) is flattened (all), or reduced
    to its last row (last) or its row mean (mean)."""
    shape = tuple(int(s) for s in embedding_shape)
    if rows not in ROWS:
        raise ConfigError(f"adapter rows must be one of {ROWS}, got {rows!r}")
    if len(shape) == 1:
        return shape[0]
    if len(shape) != 2:
        raise ConfigError(f"user embeddings must be (D,) or (rows, D), got shape {shape}")
    return shape[0] * shape[1] if rows == "all" else shape[1]


class UserProjection(nn.Module):
    """Embedding (B, *embedding_shape) -> user tokens (B, num_tokens, cross_attention_dim)."""

    def __init__(
        self,
        embedding_shape: Sequence[int],
        num_tokens: int,
        cross_attention_dim: int,
        rows: Rows = "all",
    ):
        super().__init__()
        self.embedding_shape = tuple(int(s) for s in embedding_shape)
        self.rows = rows
        self.num_tokens = int(num_tokens)
        self.cross_attention_dim = int(cross_attention_dim)
        self.in_dim = reduced_dim(self.embedding_shape, rows)
        # the key names of diffusers' IP-Adapter file layout (image_proj.proj / image_proj.norm)
        self.proj = nn.Linear(self.in_dim, self.num_tokens * self.cross_attention_dim)
        self.norm = nn.LayerNorm(self.cross_attention_dim)

    def flatten(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, *embedding_shape) -> (B, in_dim): what diffusers' ImageProjection receives as one image embed."""
        if tuple(embeddings.shape[1:]) != self.embedding_shape:
            raise InputError(
                f"user embeddings have shape {tuple(embeddings.shape[1:])} per user; the adapter was built for "
                f"{self.embedding_shape}"
            )
        if len(self.embedding_shape) == 1:
            return embeddings
        if self.rows == "last":
            return embeddings[:, -1]
        if self.rows == "mean":
            return embeddings.mean(dim=1)
        return embeddings.flatten(1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.flatten(embeddings).to(self.proj.weight.dtype)  # (B, in_dim)
        tokens = self.proj(x).reshape(x.shape[0], self.num_tokens, self.cross_attention_dim)  # (B, N, D)
        return self.norm(tokens)


class UserBranch(nn.Module):
    """One cross-attention layer's user key/value projections and its output gate."""

    def __init__(self, cross_attention_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_u = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_u = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        # zero gate: the branch adds exactly nothing until training moves it
        # shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
        self.gate = nn.Parameter(torch.zeros(1))

    def factor(self, user_scale: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``gate * user_scale`` shaped to multiply a (B, L, C) branch output ``like``: a (B,) scale is per
        sample (a 0 makes that sample's contribution exactly 0: the null user)."""
        factor = self.gate.to(like.dtype)
        if torch.is_tensor(user_scale) and user_scale.ndim > 0:
            return factor * user_scale.to(device=like.device, dtype=like.dtype).view(-1, 1, 1)
        return factor * user_scale


class SelfAttnProcessor(AttnProcessor2_0):
    """The stock SDPA processor for ``attn1`` layers; accepts and drops the user kwargs."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        user_tokens: torch.Tensor | None = None,
        user_scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d)."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class UserAttnProcessor:
    """``attn2`` processor: the stock text cross-attention plus ``user_scale * gate * SDPA(q, K_u, V_u)``.

    ``user_tokens`` (B, N, D) and ``user_scale`` (a float, or a (B,) tensor for per-sample scales such as a
    null-user mask) arrive through ``cross_attention_kwargs``. Without tokens or with a float scale of 0 the
    branch is skipped and the result is bit-identical to ``AttnProcessor2_0``.
    """

    def __init__(self, branch: UserBranch):
        self.branch = branch

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        user_tokens: torch.Tensor | None = None,
        user_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        # --- the stock text attention (the same operations, in the same order, as AttnProcessor2_0)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, L, inner)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, T, inner)
        value = attn.to_v(encoder_hidden_states)
        inner = key.shape[-1]
        query, key, value = (_heads(x, batch, attn.heads) for x in (query, key, value))  # (B, h, ., d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)  # (B, L, inner)

        # --- the user branch: shared query, new keys/values from the user tokens
        if user_tokens is not None and not (isinstance(user_scale, int | float) and user_scale == 0):
            out = out + self._branch(attn, query, user_tokens, user_scale, batch, inner)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _branch(
        self,
        attn,
        query: torch.Tensor,
        user_tokens: torch.Tensor,
        user_scale: float | torch.Tensor,
        batch: int,
        inner: int,
    ) -> torch.Tensor:
        if user_tokens.shape[0] != batch:
            raise InputError(f"user_tokens has batch {user_tokens.shape[0]}, the latents have {batch}")
        branch = self.branch
        tokens = user_tokens.to(branch.to_k_u.weight.dtype)  # adapter weights may be fp32 over a bf16 UNet
        key_u = _heads(branch.to_k_u(tokens).to(query.dtype), batch, attn.heads)  # (B, h, N, d)
        value_u = _heads(branch.to_v_u(tokens).to(query.dtype), batch, attn.heads)
        if attn.norm_k is not None:
            key_u = attn.norm_k(key_u)
        user_out = F.scaled_dot_product_attention(query, key_u, value_u, dropout_p=0.0, is_causal=False)
        user_out = user_out.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)  # (B, L, inner)
        return branch.factor(user_scale, user_out) * user_out


def cross_attention_layers(unet) -> dict[str, int]:
    """Processor name -> block width for every cross-attention layer of a UNet2DConditionModel, in
    ``unet.attn_processors`` order (the order diffusers numbers IP-Adapter keys in).

    The width follows diffusers' own rule (mid block: last width; ``down_blocks.i``: width i; ``up_blocks.i``:
    reversed widths) and is checked against the layer's ``to_k``.
    """
    widths = tuple(unet.config.block_out_channels)
    layers: dict[str, int] = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            width = widths[-1]
        elif name.startswith("up_blocks"):
            width = widths[::-1][int(name.split(".")[1])]
        elif name.startswith("down_blocks"):
            width = widths[int(name.split(".")[1])]
        else:
            raise ConfigError(f"cannot place a user branch on attention layer {name!r}")
        to_k = layer_module(unet, name).to_k
        if to_k.out_features != width:
            raise ConfigError(
                f"{name}: to_k has width {to_k.out_features}, the block is {width} wide; not a standard "
                "UNet2DConditionModel layout"
            )
        layers[name] = width
    if not layers:
        raise ConfigError("the denoiser has no cross-attention layers to carry user tokens")
    return layers


def layer_module(unet, processor_name: str) -> nn.Module:
    """The ``Attention`` module a processor name belongs to."""
    return unet.get_submodule(processor_name.removesuffix(_PROCESSOR_SUFFIX))


def branch_key(processor_name: str) -> str:
    """The ``branches`` key of a layer; ModuleDict keys cannot contain dots, so
    'up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor' -> 'up_blocks-0-attentions-1-...-attn2'."""
    return processor_name.removesuffix(_PROCESSOR_SUFFIX).replace(".", "-")


class UserAdapter(nn.Module):
    """The trainable part: the projection and one :class:`UserBranch` per cross-attention layer.

    Build a fresh one with ``Backbone.new_adapter`` (it knows the layers and what each branch starts from)
    and put it on the denoiser with ``Backbone.install_adapter``. ``layers`` maps layer names to block widths
    in the denoiser's order (the order export numbers layers in). :meth:`install` / :meth:`uninstall` are the
    ``UNet2DConditionModel`` wiring those backbone methods use by default.
    """

    def __init__(
        self,
        embedding_shape: Sequence[int],
        cross_attention_dim: int,
        layers: Mapping[str, int] | Sequence[tuple[str, int]],
        num_tokens: int = 4,
        rows: Rows = "all",
    ):
        super().__init__()
        layers = dict(layers)  # a mapping, or (name, width) pairs as config() writes them
        self.projection = UserProjection(embedding_shape, num_tokens, cross_attention_dim, rows)
        self.layer_names: tuple[str, ...] = tuple(layers)
        self.branches = nn.ModuleDict(
            {branch_key(name): UserBranch(cross_attention_dim, width) for name, width in layers.items()}
        )

    # ------------------------------------------------------------------------------------------ metadata

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return self.projection.embedding_shape

    @property
    def num_tokens(self) -> int:
        return self.projection.num_tokens

    @property
    def cross_attention_dim(self) -> int:
        return self.projection.cross_attention_dim

    def branch(self, processor_name: str) -> UserBranch:
        return self.branches[branch_key(processor_name)]

    def layer_widths(self) -> dict[str, int]:
        return {name: self.branch(name).to_k_u.out_features for name in self.layer_names}

    def config(self) -> dict:
        """JSON-able constructor arguments: ``UserAdapter(**config)`` rebuilds the same architecture."""
        return {
            "embedding_shape": list(self.embedding_shape),
            "cross_attention_dim": self.cross_attention_dim,
            "layers": [[name, width] for name, width in self.layer_widths().items()],  # ordered pairs
            "num_tokens": self.num_tokens,
            "rows": self.projection.rows,
        }

    # ------------------------------------------------------------------------------------------ wiring

    def install(self, unet) -> None:
        """Set a :class:`UserAttnProcessor` on every adapted layer and a :class:`SelfAttnProcessor` elsewhere."""
        names = list(unet.attn_processors)
        missing = [n for n in self.layer_names if n not in names]
        if missing:
            raise ConfigError(
                f"the denoiser has no attention layers {missing[:3]} that this adapter was built for"
            )
        processors = {}
        for name in names:
            if name in self.layer_names:
                attn = layer_module(unet, name)
                branch = self.branch(name)
                if (attn.to_k.in_features, attn.to_k.out_features) != (
                    branch.to_k_u.in_features,
                    branch.to_k_u.out_features,
                ):
                    raise ConfigError(f"{name}: the adapter's branch does not match the layer's width")
                processors[name] = UserAttnProcessor(branch)
            else:
                processors[name] = SelfAttnProcessor()
        unet.set_attn_processor(processors)

    @staticmethod
    def uninstall(unet) -> None:
        """Back to diffusers' stock processors."""
        unet.set_attn_processor(AttnProcessor2_0())

    # ------------------------------------------------------------------------------------------ use

    def tokens(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, *embedding_shape) -> user tokens (B, num_tokens, cross_attention_dim)."""
        return self.projection(embeddings)

    def condition(
        self,
        embeddings: torch.Tensor,
        scale: float = 1.0,
        null: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """``(user_tokens, user_scale)`` for ``Backbone.denoise``. ``null`` (B,) bool marks null users: their
        scale is 0, so their samples are exactly the base model (and get no gradient)."""
        user_tokens = self.tokens(embeddings)
        if null is None:
            return user_tokens, scale
        keep = (~null.to(device=user_tokens.device, dtype=torch.bool)).to(torch.float32)  # (B,)
        return user_tokens, keep * scale


def embedding_dropout(
    batch_size: int,
    rate: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training-time null-user mask (batch_size,) bool: each user is replaced by the null user with
    probability ``rate`` (the paper; drawn on the generator's device)."""
    if not 0 <= rate < 1:
        raise ConfigError(f"embedding dropout rate must be in [0, 1), got {rate}")
    device = generator.device if generator is not None else "cpu"
    return torch.rand(batch_size, generator=generator, device=device) < rate

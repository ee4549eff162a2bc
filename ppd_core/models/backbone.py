"""The one backbone interface: encode prompts, encode/decode images, the noise schedule, and a
denoiser call that optionally carries user tokens.

Training, caching and sampling code only talk to :class:`Backbone`; the toy pixel-space model, the
Stable Diffusion family and the Stable Cascade prior each implement it. ``x0`` below is what the
denoiser works on: pixels in [-1, 1] for the toy backbone, scaled VAE latents for SD, Stage-C
latents for Cascade.

The user adapter has one mechanism for every backbone: the backbone says which of its layers get a user
branch (:meth:`Backbone.adapter_layers`) and what a fresh branch starts from
(:meth:`Backbone.adapter_initial_weights`), builds the adapter (:meth:`Backbone.new_adapter`) and puts it
on or takes it off its denoiser (:meth:`Backbone.install_adapter` / :meth:`Backbone.uninstall_adapter`).
Training, export, evaluation and ``ppd generate`` call only these. The defaults fit a diffusers
``UNet2DConditionModel`` (toy and SD); the Stable Cascade prior overrides them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Literal

import torch

from ppd_core.models.adapter import UserAdapter, cross_attention_layers, layer_module


class Backbone(abc.ABC):
    #: "toy" | "sd" | "cascade"
    kind: str
    prediction_type: Literal["epsilon", "v_prediction"]
    #: the module whose cross-attention layers receive the user adapter (e.g. a UNet2DConditionModel)
    denoiser: torch.nn.Module

    @property
    @abc.abstractmethod
    def x0_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser works on at the configured resolution."""

    @property
    @abc.abstractmethod
    def cross_attention_dim(self) -> int:
        """Width of the conditioning tokens (text states, and so user tokens)."""

    @abc.abstractmethod
    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        """Text conditioning (B, T, cross_attention_dim); "" is the unconditional prompt."""

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> x0 (B, *x0_shape). SD samples the VAE posterior."""

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 -> images float (B, 3, H, W) in [0, 1]."""

    @abc.abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps (B,) drawn uniformly from the schedule."""

    @abc.abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_t."""

    @abc.abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict (epsilon or v)."""

    @abc.abstractmethod
    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        user_tokens: torch.Tensor | None = None,
        user_scale: float = 1.0,
    ) -> torch.Tensor:
        """The denoiser's prediction. ``user_tokens`` (B, N, cross_attention_dim) reach the installed user
        adapter; None (or scale 0) is exactly the base model."""

    @abc.abstractmethod
    def inference_scheduler(self, steps: int):
        """A diffusers scheduler for sampling with ``set_timesteps(steps)`` already called; the sampler loop is
        ``for t in sched.timesteps: x = sched.step(denoise(x, t, ...), t, x).prev_sample``."""

    @abc.abstractmethod
    def save(self, directory) -> None:
        """Write the backbone in its real on-disk layout (save_pretrained); ``load`` must read it back exactly."""

    @abc.abstractmethod
    def identity(self) -> dict:
        """JSON-able identity (kind, model id, weights digest, resolution): keys latent caches and exports."""

    # ------------------------------------------------------------------------------------------ adapter

    def adapter_layers(self) -> dict[str, int]:
        """Layer name -> block width of every layer that gets a user branch, in export order. Default: the
        ``attn2`` layers of a ``UNet2DConditionModel`` (processor names, the order diffusers numbers
        IP-Adapter keys in)."""
        return cross_attention_layers(self.denoiser)

    def adapter_initial_weights(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What a fresh branch's ``to_k_u`` / ``to_v_u`` start from (cross_attention_dim -> width matrices).
        Default: the layer's own ``to_k`` / ``to_v`` (IP-Adapter practice)."""
        attn = layer_module(self.denoiser, layer)
        return attn.to_k.weight, attn.to_v.weight

    def new_adapter(
        self,
        embedding_shape: Sequence[int],
        *,
        num_tokens: int = 4,
        rows: str = "all",
        seed: int = 0,
    ) -> UserAdapter:
        """A fresh adapter for this backbone (float32 master weights on the denoiser's device): seeded
        projection, branches from :meth:`adapter_initial_weights`, gates 0, so it is exactly the base model."""
        layers = self.adapter_layers()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = UserAdapter(
                embedding_shape, self.cross_attention_dim, layers, num_tokens=num_tokens, rows=rows
            )
        with torch.no_grad():
            for name in adapter.layer_names:
                to_k, to_v = self.adapter_initial_weights(name)
                adapter.branch(name).to_k_u.weight.copy_(to_k)
                adapter.branch(name).to_v_u.weight.copy_(to_v)
        return adapter.to(device=next(self.denoiser.parameters()).device)

    def install_adapter(self, adapter: UserAdapter) -> None:
        """Route ``denoise``'s user tokens through ``adapter``'s branches (replaces an installed adapter)."""
        adapter.install(self.denoiser)

    def uninstall_adapter(self) -> None:
        """Back to the base denoiser's own attention processors."""
        UserAdapter.uninstall(self.denoiser)

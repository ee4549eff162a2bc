"""The one backbone interface: encode prompts, encode/decode images, the noise schedule, and a
denoiser call that optionally carries user tokens.

Training, caching and sampling code only talk to :class:`Backbone`; the toy pixel-space model, the
Stable Diffusion family and the Stable Cascade prior each implement it. ``x0`` below is what the
denoiser works on: pixels in [-1, 1] for the toy backbone, scaled VAE latents for SD, Stage-C
latents for Cascade.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch


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

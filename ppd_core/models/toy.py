"""The toy backbone: a tiny pixel-space ``UNet2DConditionModel`` with a tiny CLIP text encoder.

Built from :class:`~ppd_core.config.PretrainConfig`, trained from scratch by the ``pretrain`` stage on
the synthetic world's 16 px images, and saved in the diffusers/transformers layouts so that loading
takes the same ``from_pretrained`` path as a real checkpoint (the toy-world measurements has the
measurements behind each choice)::

    backbone.json       {"kind": "toy", "resolution": 16, "prediction_type": "v_prediction", ...}
    unet/               UNet2DConditionModel.save_pretrained (config.json + safetensors)
    text_encoder/       CLIPTextModel.save_pretrained
    tokenizer/          CLIPTokenizer: vocab.json, merges.txt, tokenizer.json, tokenizer_config.json
    scheduler/          DDPMScheduler scheduler_config.json (cosine betas, v-prediction)

Choices:

- **Pixel space**: x0 is the image in [-1, 1], (3, R, R); encode/decode are affine maps.
- **Attention only at the deepest level** (8x8 at 16 px, 16x16 at 32 px): down blocks are
  ``DownBlock2D`` except the last, ``CrossAttnDownBlock2D``; up blocks mirror them; the mid block
  always attends. Self-attention at full resolution dominated the step time (the CPU measurements).
- **v-prediction on a cosine schedule** (``squaredcos_cap_v2``), sampled with DDIM on ``trailing``
  timesteps (so the first step starts from pure noise): epsilon-prediction gave grainy images with
  saturated backgrounds at this scale.
- **No x0 clipping** (``clip_sample=False``; :meth:`ToyBackbone.decode` clamps the result). DDIM clips
  its x0 estimate but keeps the unclipped noise estimate, and under guidance the two drift apart: on
  the default world's 1000-step base, guidance 3, clipping gave colour accuracy 1.0 / 0.93 / 0.48 at
  10 / 20 / 50 steps, without it 1.0 at each.
- **A random, frozen text encoder** (CLIP's real tokenizer, 49,408 tokens, a 2-layer transformer):
  ``pretrain`` trains only the UNet, as Stable Diffusion keeps CLIP frozen (see :mod:`ppd_core.train.pretrain`).
- **16 text tokens** instead of CLIP's 77 (the text encoder keeps 77 positions): the world's captions
  ("an orange triangle") take 5 with BOS/EOS, and every cross-attention layer is ~4x cheaper. Longer
  captions are truncated.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ppd_core.config import PretrainConfig
from ppd_core.errors import StageError
from ppd_core.models.backbone import Backbone
from ppd_core.models.text import build_offline_clip_tokenizer, build_tiny_text_encoder, save_clip_tokenizer

KIND = "toy"
BACKBONE_FILE = "backbone.json"
COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
TOY_MAX_TOKENS = 16
ATTENTION_HEADS = 8  # diffusers' ``attention_head_dim`` is in fact the number of heads per block
MAX_NORM_GROUPS = 32
FORMAT_VERSION = 1


def unet_config(cfg: PretrainConfig, resolution: int) -> dict:
    """``UNet2DConditionModel`` arguments: pixel space, one ResNet per level, attention at the deepest level."""
    widths = tuple(cfg.block_out_channels)
    levels = len(widths)
    if levels < 2:
        raise ValueError("pretrain.block_out_channels needs at least two levels (one downsampling)")
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2^{levels - 1} ({levels} UNet levels)")
    groups = math.gcd(MAX_NORM_GROUPS, *widths)
    if any(w % ATTENTION_HEADS for w in widths):
        raise ValueError(f"pretrain.block_out_channels {widths} must be multiples of {ATTENTION_HEADS} heads")
    return {
        "sample_size": resolution,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": widths,
        "down_block_types": ("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
        "up_block_types": ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        "cross_attention_dim": cfg.cross_attention_dim,
        "attention_head_dim": ATTENTION_HEADS,
        "norm_num_groups": groups,
    }


def noise_scheduler(cfg: PretrainConfig) -> DDPMScheduler:
    """Training schedule: cosine betas, v-prediction; no x0 clipping in the sampler (see the module docstring)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
    )


def state_digest(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 over every tensor of the modules' state dicts (name, dtype, shape and raw bytes, sorted).

    Hashing tensors rather than files gives an unsaved model and its saved-and-reloaded copy the same
    digest (the reload is bit-identical), with one mechanism for both.
    """
    h = hashlib.sha256()
    for prefix in sorted(modules):
        state = modules[prefix].state_dict()
        for key in sorted(state):
            t = state[key].detach().to("cpu").contiguous()
            h.update(f"{prefix}.{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def has_user_adapter(unet: torch.nn.Module) -> bool:
    """Whether an attention processor takes ``user_tokens``: diffusers' ``Attention`` forwards a
    cross-attention kwarg only to processors whose ``__call__`` names it, and drops it otherwise."""
    return any(
        "user_tokens" in inspect.signature(proc.__call__).parameters for proc in unet.attn_processors.values()
    )


class ToyBackbone(Backbone):
    """Tiny pixel-space text-to-image model behind the :class:`Backbone` interface."""

    kind = KIND

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMScheduler,
        resolution: int,
        weights_digest: str | None = None,
    ) -> None:
        self.unet = unet
        self.denoiser = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.resolution = int(resolution)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise StageError(f"toy backbone: unsupported prediction_type {self.prediction_type!r}")
        self._weights_digest = weights_digest  # of the saved/loaded weights; None: compute on demand

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def create(cls, cfg: PretrainConfig, resolution: int, seed: int) -> ToyBackbone:
        """Random initialisation from config (seeded; the global RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**unet_config(cfg, resolution))
        text_encoder = build_tiny_text_encoder(cfg, seed)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_offline_clip_tokenizer(tmp, model_max_length=TOY_MAX_TOKENS)
        return cls(unet, text_encoder, tokenizer, noise_scheduler(cfg), resolution)

    def networks(self) -> dict[str, torch.nn.Module]:
        """The modules with weights, by component name."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def save(self, directory) -> None:
        """Write every component with its own ``save_pretrained``, then ``backbone.json``.

        Saves the base model only: save before installing a user adapter (adapters are exported separately).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        save_clip_tokenizer(self.tokenizer, directory / "tokenizer")
        self.scheduler.save_pretrained(directory / "scheduler")
        self._weights_digest = state_digest(self.networks())
        meta = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "components": list(COMPONENTS),
            "weights_digest": self._weights_digest,
        }
        (directory / BACKBONE_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(
        cls, directory, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> ToyBackbone:
        """Read a :meth:`save` directory back (bit-identical weights) as a frozen model in eval mode."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / BACKBONE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise StageError(f"{directory}: not a toy backbone ({BACKBONE_FILE}: {e})") from None
        if meta.get("kind") != KIND:
            raise StageError(f"{directory}: backbone kind {meta.get('kind')!r}, expected {KIND!r}")
        unet = UNet2DConditionModel.from_pretrained(directory / "unet")
        text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        networks = {"unet": unet, "text_encoder": text_encoder}
        digest = state_digest(networks)  # of the weights as saved, before any dtype cast
        for net in networks.values():
            net.to(device).eval().requires_grad_(False)
            if net.dtype != dtype:  # only when needed: diffusers warns on any ``to(dtype=...)``
                net.to(dtype=dtype)
        return cls(unet, text_encoder, tokenizer, scheduler, meta["resolution"], weights_digest=digest)

    # -------------------------------------------------------------------------------- interface

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        """Last hidden states of the text encoder, (B, TOY_MAX_TOKENS, D); padded with <|endoftext|>."""
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # (B, T)
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state  # (B, T, D)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> pixels in [-1, 1] (B, 3, R, R)."""
        images = torch.as_tensor(images)
        if images.dtype == torch.uint8:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(images.shape)}")
            x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        else:
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"float images must be (B, 3, H, W), got {tuple(images.shape)}")
            x = images.float()
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(
                f"images are {tuple(x.shape[-2:])}, the toy backbone works at {self.resolution} px"
            )
        return (x * 2.0 - 1.0).to(device=self.device, dtype=self.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)  # on the generator's CPU
        return t.to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)  # sqrt(a_t) x0 + sqrt(1 - a_t) noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t)  # sqrt(a_t) noise - sqrt(1 - a_t) x0

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        user_tokens: torch.Tensor | None = None,
        user_scale: float = 1.0,
    ) -> torch.Tensor:
        kwargs = None
        if user_tokens is not None:
            if not has_user_adapter(self.unet):
                raise RuntimeError(
                    "denoise got user_tokens, but no user adapter is installed on the toy backbone's UNet "
                    "(no attention processor takes `user_tokens`; install the adapter first)"
                )
            kwargs = {"user_tokens": user_tokens, "user_scale": user_scale}
        t = torch.as_tensor(t, device=x_t.device)
        return self.unet(x_t, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample

    def inference_scheduler(self, steps: int) -> DDIMScheduler:
        """DDIM (eta 0) on trailing timesteps of the training schedule; ``timesteps`` stay on the CPU."""
        sched = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        return sched

    def identity(self) -> dict:
        """``weights_digest``: :func:`state_digest` of the UNet and text encoder, fixed when saved or
        loaded; for a model never saved, computed from its current weights at each call."""
        digest = self._weights_digest or state_digest(self.networks())
        return {
            "kind": KIND,
            "model_id": KIND,
            "weights_digest": digest,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
        }

"""The Stable Diffusion family (1.x, 2.x, XL) behind :class:`~ppd_core.models.backbone.Backbone`, and a
tiny random checkpoint in the real diffusers layout for tests and device checks.

A checkpoint is a hub id or a local directory in the layout ``save_pretrained`` writes::

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/  [text_encoder_2/  tokenizer_2/]

Conventions:

- ``x0`` is the VAE latent: ``(posterior sample - shift_factor) * scaling_factor``. The VAE always runs in
  float32 (SDXL's VAE overflows in float16; it is small); the UNet and text encoders use ``backbone.dtype``.
- Training noise comes from a ``DDPMScheduler`` built from the checkpoint's scheduler config; sampling uses a
  ``DDIMScheduler`` (trailing spacing, no clipping) from the same config. ``prediction_type`` is the
  config's unless ``backbone.prediction_type`` overrides it.
- SDXL needs pooled text embeddings next to the token states. :meth:`SDBackbone.encode_prompt` packs them
  as one extra row: ``text[:, :-1]`` are the concatenated penultimate states of both encoders (B, 77, 2048),
  ``text[:, -1, :P]`` is text_encoder_2's pooled projection (zeros beyond P). Treat ``text`` as opaque: it is
  meant for :meth:`SDBackbone.denoise`, which unpacks it and adds the size/crop ``time_ids``
  (resolution, resolution, 0, 0, resolution, resolution). As in the XL pipeline with
  ``force_zeros_for_empty_prompt``, an empty caption encodes to zeros.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ppd_core.config import BackboneConfig
from ppd_core.errors import ConfigError, InputError
from ppd_core.models.adapter import UserAttnProcessor, cross_attention_layers
from ppd_core.models.backbone import Backbone
from ppd_core.models.text import build_offline_clip_tokenizer, save_clip_tokenizer
from ppd_core.weights import local_snapshot, weight_file_sha256

_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _to_unit_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> float (B, 3, res, res): centre crop + resize."""
    x = images.permute(0, 3, 1, 2).float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(
            f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W); got {tuple(images.shape)}"
        )
    height, width = x.shape[-2:]
    if (height, width) != (resolution, resolution):
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = x[..., top : top + side, left : left + side]
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return x


class SDBackbone(Backbone):
    """Any diffusers Stable Diffusion 1.x / 2.x / XL checkpoint, frozen and in eval mode."""

    kind = "sd"

    def __init__(self, cfg: BackboneConfig, device: str | torch.device = "cpu"):
        if not cfg.model:
            raise ConfigError("backbone.model must name a hub id or a local directory for kind 'sd'")
        self.cfg = cfg
        self.model = cfg.model
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.dtype)
        model = cfg.model

        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=self.dtype)
        self.is_xl = self.unet.config.addition_embed_type == "text_time"
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
        self.tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")]
        if self.is_xl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
            self.text_encoders = [
                CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=self.dtype),
                CLIPTextModelWithProjection.from_pretrained(
                    model, subfolder="text_encoder_2", dtype=self.dtype
                ),
            ]
        else:
            self.text_encoders = [
                CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=self.dtype)
            ]
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False).eval().to(self.device)
        self.denoiser = self.unet
        # one cross-attention layer, to check that user tokens have somewhere to go
        self._probe_layer = self.unet.get_submodule(
            next(iter(cross_attention_layers(self.unet))).removesuffix(".processor")
        )

        self.scheduler_config = dict(DDPMScheduler.load_config(model, subfolder="scheduler"))
        prediction = self.scheduler_config.get("prediction_type", "epsilon")
        if cfg.prediction_type != "auto":
            prediction = cfg.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"{model}: prediction_type {prediction!r} is not supported (epsilon, v_prediction)"
            )
        self.prediction_type = prediction
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config, prediction_type=prediction)

        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if cfg.resolution % self.vae_scale:
            raise ConfigError(f"backbone.resolution {cfg.resolution} must be a multiple of {self.vae_scale}")
        self.force_zeros_for_empty_prompt = False
        if self.is_xl:
            self._check_xl_conditioning()
        self._identity: dict | None = None

    def _check_xl_conditioning(self) -> None:
        pooled_dim = self.text_encoders[-1].config.projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * 6 + pooled_dim != expected:
            raise ConfigError(
                f"{self.model}: the UNet's added conditioning takes {expected} features, not 6 size/crop ids plus "
                f"{pooled_dim} pooled text features (SDXL refiner-style checkpoints are not supported)"
            )
        if pooled_dim > self.cross_attention_dim:
            raise ConfigError(f"{self.model}: pooled text width {pooled_dim} exceeds the token width")
        try:
            index = DiffusionPipeline.load_config(self.model)
        except (OSError, ValueError):
            index = {}
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))

    # ------------------------------------------------------------------------------------------ shapes

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        side = self.cfg.resolution // self.vae_scale
        return (self.vae.config.latent_channels, side, side)

    @property
    def cross_attention_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    # ------------------------------------------------------------------------------------------ text

    @torch.no_grad()
    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                list(captions),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if not self.is_xl:
                return encoder(ids)[0]  # last_hidden_state (B, 77, D)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
            pooled = out[0] if out[0].ndim == 2 else pooled  # text_encoder_2's projected pooled output (B, P)
        text = torch.cat(states, dim=-1)  # (B, 77, D)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([c == "" for c in captions], device=self.device).view(-1, 1)
            text = text.masked_fill(empty.view(-1, 1, 1), 0.0)
            pooled = pooled.masked_fill(empty, 0.0)
        pooled_row = F.pad(pooled, (0, text.shape[-1] - pooled.shape[-1]))[:, None]  # (B, 1, D)
        return torch.cat([text, pooled_row], dim=1)  # (B, 78, D)

    # ------------------------------------------------------------------------------------------ images

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_unit_images(images, self.cfg.resolution).to(self.device) * 2 - 1  # (B, 3, H, W) in [-1, 1]
        latents = self.vae.encode(x).latent_dist.sample(generator=generator)  # (B, C, h, w)
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        latents = x0.to(self.device, torch.float32) / self.vae.config.scaling_factor
        latents = latents + (self.vae.config.shift_factor or 0.0)
        images = self.vae.decode(latents).sample  # (B, 3, H, W) in about [-1, 1]
        return ((images + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------------ schedule

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        steps = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (n,), generator=generator, device=device).to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(x0, noise, t)

    def inference_scheduler(self, steps: int) -> DDIMScheduler:
        scheduler = DDIMScheduler.from_config(
            self.scheduler_config,
            timestep_spacing="trailing",
            clip_sample=False,
            prediction_type=self.prediction_type,
        )
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    # ------------------------------------------------------------------------------------------ denoiser

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        user_tokens: torch.Tensor | None = None,
        user_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        batch = x_t.shape[0]
        x_t = x_t.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device)
        t = t.expand(batch) if t.ndim == 0 else t
        text = text.to(self.device, self.dtype)
        added = None
        if self.is_xl:
            expected = self.tokenizers[0].model_max_length + 1
            if text.shape[1] != expected:
                raise InputError(
                    f"SDXL text must come from encode_prompt ({expected} rows); got {text.shape[1]}"
                )
            pooled_dim = self.text_encoders[-1].config.projection_dim
            text, pooled = text[:, :-1], text[:, -1, :pooled_dim]  # (B, 77, D), (B, P)
            res = self.cfg.resolution
            time_ids = torch.tensor([res, res, 0, 0, res, res], device=self.device, dtype=self.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(batch, 6)}
        kwargs = None
        if user_tokens is not None:
            if not isinstance(self._probe_layer.processor, UserAttnProcessor):
                raise ConfigError("user tokens were given but no user adapter is installed on the UNet")
            kwargs = {"user_tokens": user_tokens, "user_scale": user_scale}
        out = self.unet(
            x_t, t, encoder_hidden_states=text, added_cond_kwargs=added, cross_attention_kwargs=kwargs
        ).sample
        return out.float()

    # ------------------------------------------------------------------------------------------ storage

    def save(self, directory) -> None:
        """The standard pipeline layout (model_index.json + component folders); reload with
        ``SDBackbone(BackboneConfig(kind="sd", model=directory))``."""
        # the checkpoint's own scheduler class, so the saved layout matches what was loaded
        sched_cls = getattr(diffusers, self.scheduler_config.get("_class_name", ""), DDPMScheduler)
        scheduler = sched_cls.from_config(self.scheduler_config)
        common = {"vae": self.vae, "unet": self.unet, "scheduler": scheduler}
        if self.is_xl:
            pipe = StableDiffusionXLPipeline(
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                **common,
            )
        else:
            pipe = StableDiffusionPipeline(
                text_encoder=self.text_encoders[0],
                tokenizer=self.tokenizers[0],
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **common,
            )
        _save_pipeline(pipe, directory)

    def identity(self) -> dict:
        if self._identity is None:
            weights, revision = _weights_digest(self.model)
            self._identity = {
                "kind": self.kind,
                "model_id": self.model,
                "revision": revision,
                "weights_digest": weights,
                "resolution": self.cfg.resolution,
                "prediction_type": self.prediction_type,
                "dtype": self.cfg.dtype,
            }
        return self._identity


# --------------------------------------------------------------------------------------------- identity


def _weights_digest(model: str) -> tuple[str, str | None]:
    """sha256 over the weight files and configs of unet/, vae/ and the text encoders (everything the latents,
    text states and predictions depend on). A hub id is resolved in the local cache only (never downloaded);
    if it is not there the digest is ``id@revision``. Returns (digest, revision or None)."""
    root, revision = local_snapshot(model), None
    if root is None:  # not cached, offline, or not a hub id: fall back to the name
        return f"{model}@main", "main"
    if not Path(model).expanduser().is_dir():
        revision = root.name  # a hub snapshot directory is named by its revision
    h = hashlib.sha256()
    for folder in _WEIGHT_FOLDERS:
        sub = root / folder
        if not sub.is_dir():
            continue
        files = sorted(sub.glob("*.safetensors")) or sorted(sub.glob("*.bin"))
        for path in files:
            h.update(f"{folder}/{path.name}:{weight_file_sha256(path)}\n".encode())
        if (sub / "config.json").is_file():
            h.update(f"{folder}/config.json:{_config_digest(sub / 'config.json')}\n".encode())
    return h.hexdigest(), revision


def _config_digest(path: Path) -> str:
    """A component config without the bookkeeping save_pretrained adds (``_name_or_path``, versions)."""
    config = json.loads(path.read_text())
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- tiny model


def _save_pipeline(pipe: DiffusionPipeline, directory: str | Path) -> None:
    """``save_pretrained`` plus ``vocab.json`` / ``merges.txt`` in the tokenizer folders, as SD repos ship them
    (transformers 5 writes only ``tokenizer.json``)."""
    pipe.save_pretrained(directory)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            save_clip_tokenizer(tokenizer, Path(directory) / name)


def _tiny_text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        **extra,
    )


def build_tiny_sd(
    out_dir: str | Path,
    xl: bool = False,
    seed: int = 0,
    prediction_type: str = "epsilon",
) -> Path:
    """A random tiny SD 1.x-style (or SDXL-style) checkpoint in the real pipeline layout, for tests and device
    checks: 32 px images -> 4x16x16 latents, UNet widths (32, 64) with attention at 8x8 only, 2-layer CLIP
    text encoders of width 32 (XL: two, concatenated to 64, plus a pooled projection of 32)."""
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_extra = {}
        if xl:
            unet_extra = {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32,
                "use_linear_projection": True,
            }
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64 if xl else 32,
            attention_head_dim=8,
            norm_num_groups=32,
            **unet_extra,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
            scaling_factor=0.13025 if xl else 0.18215,
        )
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_offline_clip_tokenizer(tmp)  # CLIP's real BPE, offline
        schedule = {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "steps_offset": 1,
        }
        if xl:
            scheduler = EulerDiscreteScheduler(
                **schedule, timestep_spacing="leading", prediction_type=prediction_type
            )
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=CLIPTextModel(_tiny_text_config()),
                text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(projection_dim=32)),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=scheduler,
            )
        else:
            scheduler = PNDMScheduler(
                **schedule,
                skip_prk_steps=True,
                set_alpha_to_one=False,
                prediction_type=prediction_type,
            )
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=CLIPTextModel(_tiny_text_config()),
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    _save_pipeline(pipe, out_dir)
    return out_dir

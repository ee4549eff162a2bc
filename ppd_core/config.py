"""One typed config tree for the whole pipeline (the design).

Sources, lowest to highest precedence: field defaults < YAML preset < ``PPD_*`` environment
variables (``PPD_FEWSHOT__SEED=3``, sections joined by ``__``) < dotted CLI overrides
(``--set fewshot.seed=3``). Every model is frozen and forbids unknown keys, so a typo is an error
that names the key. Every field carries a docstring (``description``) that doubles as help text.

Fields marked ``volatile`` (paths, worker counts, batch sizes that do not change results) are left
out of :func:`fingerprint`, which names output directories and Prefect cache keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ppd_core.errors import ConfigError

CONFIG_VERSION = 1
ENV_PREFIX = "PPD_"


def volatile(default: Any, description: str, **kw: Any) -> Any:
    """A field that does not change results: excluded from fingerprints."""
    return Field(default, description=description, json_schema_extra={"volatile": True}, **kw)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _safe_name(value: str) -> str:
    """A user-given name that becomes a file or directory name: one plain path component."""
    if not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a safe name: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (it names files and directories, so no '/', '..' or spaces)"
        )
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class RunConfig(Section):
    """Where outputs live and global knobs."""

    root: str = volatile(
        "runs/demo",
        "Run root: every stage output, cache record and the local Prefect database live under it.",
    )
    seed: int = Field(
        0, description="Global seed; stages derive their own seeds from it unless they set one."
    )
    workers: int = volatile(2, "Worker threads/processes for data stages (does not change results).")
    task_runner: Literal["threads", "dask"] = volatile(
        "threads",
        "Where a stage's shards run: threads of the `ppd` process (embed shards; relabel and evaluate keep their "
        "batches in the process), or dask worker processes, each pinned to its own device, for the embed shards "
        "(embed.shard_workers at once), relabel scoring chunks and evaluate generation and scoring batches "
        "(run.workers at once). Install the `dask` extra.",
    )
    cluster_address: str | None = volatile(
        None,
        "Scheduler address of a running Dask cluster to join (tcp://host:8786) when task_runner is dask; "
        "None starts a local cluster of the stage's worker count for the stage.",
    )
    server_idle_seconds: float = volatile(
        300.0,
        "Seconds a root's background Prefect server, started by the first command that needs one, stays up "
        "unused before stopping itself (0: none is kept; each command starts Prefect's temporary server).",
        ge=0,
        allow_inf_nan=False,
    )


class QuirkRates(Section):
    """Fractions of rows carrying each real-data quirk (Pick-a-Pic v2 has all of them)."""

    tie: float = Field(0.06, ge=0, le=1, description="Rows labelled 0.5/0.5 (a tie).")
    unlabeled: float = Field(0.04, ge=0, le=1, description="Rows with has_label = false.")
    identical: float = Field(
        0.02, ge=0, le=1, description="Rows whose two images are identical (are_different = false)."
    )
    missing_caption: float = Field(0.01, ge=0, le=1, description="Rows with an empty or null caption.")
    duplicate: float = Field(0.01, ge=0, le=1, description="Rows that exactly repeat an earlier row.")
    bad_image: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Rows with empty or undecodable image bytes (off by default; tests turn it on).",
    )

    @model_validator(mode="after")
    def _check_total(self) -> QuirkRates:
        total = (
            self.tie
            + self.unlabeled
            + self.identical
            + self.missing_caption
            + self.duplicate
            + self.bad_image
        )
        if total > 1:
            raise ValueError(
                f"quirk rates add up to {total:.3f}; a row carries at most one quirk, so at most 1"
            )
        return self


class WorldConfig(Section):
    """The embedded synthetic preference world."""

    seed: int = Field(0, description="Seed of the world: users, images and labels.")
    num_users: int = Field(96, ge=2, description="Number of users.")
    num_archetypes: int = Field(6, ge=1, description="Number of user archetypes (taste clusters).")
    user_noise: float = Field(
        0.3, ge=0, description="Std of each user's deviation from their archetype's preference weights."
    )
    image_size: int = Field(16, ge=8, description="Side of the rendered square images, in pixels.")
    supersample: int = Field(
        4, ge=1, description="Render at image_size * supersample and downsample (anti-aliasing)."
    )
    mean_pairs_per_user: float = Field(
        60.0, gt=0, description="Mean labelled rows per user (the distribution is long-tailed)."
    )
    pairs_per_user_sigma: float = Field(
        0.9, ge=0, description="Log-normal sigma of rows per user: the long tail."
    )
    min_rows_per_user: int = Field(3, ge=1, description="Fewest rows a user has.")
    max_rows_per_user: int = Field(400, ge=1, description="Most rows a user has.")
    bt_scale: float = Field(
        3.0,
        gt=0,
        description="Bradley-Terry scale: P(image 0 preferred) = sigmoid(bt_scale * (r0 - r1)), rewards in attribute-std units.",
    )
    shift_min: float = Field(
        1.5,
        gt=0,
        description="Smallest shift, in attribute std, between the two images of a pair along each changed attribute.",
    )
    shift_max: float = Field(3.0, gt=0, description="Largest such shift.")
    image_reuse: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Fraction of rows that reuse an earlier image of the same caption (image uids repeat across rows, as in Pick-a-Pic).",
    )
    quirks: QuirkRates = Field(default_factory=QuirkRates, description="Rates of real-data quirks.")
    start_date: dt.date = Field(dt.date(2023, 5, 1), description="First creation date.")
    days: int = Field(30, ge=1, description="Rows are spread over this many days.")
    rows_per_file: int = Field(2000, ge=1, description="Rows per Parquet shard.")
    row_group_rows: int = Field(500, ge=1, description="Rows per Parquet row group.")

    @model_validator(mode="after")
    def _check_ranges(self) -> WorldConfig:
        if self.shift_min > self.shift_max:
            raise ValueError("shift_min must be <= shift_max")
        if self.min_rows_per_user > self.max_rows_per_user:
            raise ValueError("min_rows_per_user must be <= max_rows_per_user")
        return self


class IngestConfig(Section):
    """Ingestion of Pick-a-Pic v2 Parquet into pairs, image shards and a quarantine table."""

    source: str | None = Field(
        None,
        description="Pick-a-Pic v2 Parquet: a local directory, a glob, or any fsspec URL (s3://, gs://, hf://, ...). "
        "None ingests the synthetic world of this run.",
    )
    images: Literal["auto", "required", "none"] = Field(
        "auto",
        description="auto: write image shards when jpg_0/jpg_1 are present (the metadata-only twin has none); "
        "required: error without image columns; none: ignore image bytes.",
    )
    image_check: Literal["header", "full"] = Field(
        "header",
        description="header: parse the image header and check the end marker (no pixel decode); full: decode every image.",
    )
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP"), description="Accepted image formats (PIL names)."
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Images with more pixels are rejected as decompression bombs."
    )
    max_image_bytes: int = Field(
        64 * 2**20, gt=0, description="Images larger than this many bytes are rejected."
    )
    batch_rows: int = volatile(256, "Rows read per Arrow batch while streaming (bounds memory).", gt=0)
    shard_max_images: int = volatile(5000, "Images per webdataset tar shard.", gt=0)
    pairs_rows_per_file: int = volatile(200_000, "Rows per Parquet file inside a date partition.", gt=0)
    partitioned: bool = Field(
        False,
        description="Ingest one creation day at a time into <root>/partitions/ingest (only days missing or failed) "
        "and give the later stages the union of the complete days (`ppd run --partitioned`).",
    )
    start: str | None = Field(
        None,
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="Partitioned ingest only: first creation day (YYYY-MM-DD) of the union; None: the source's first.",
    )
    end: str | None = Field(
        None,
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="Partitioned ingest only: last creation day (inclusive); None: the source's last.",
    )

    @model_validator(mode="after")
    def _check_window(self) -> IngestConfig:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                try:
                    dt.date.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"{name} {value!r} is not a date in the form YYYY-MM-DD") from None
        if (self.start or self.end) and not self.partitioned:
            raise ValueError("start and end choose the days of a partitioned ingest: set partitioned too")
        if self.start and self.end and self.start > self.end:
            raise ValueError(f"start {self.start} is after end {self.end}")
        return self


class FewshotConfig(Section):
    """Few-shot sets per user, seen/unseen split, held-out evaluation pairs (the design)."""

    seed: int = Field(
        0,
        description="Seed of the order of a user's pairs within each creation day and of the training pairs' "
        "conditioning sets (each draw depends only on this seed and the pair id).",
    )
    shots: int = Field(4, ge=1, description="Labelled pairs per shot set (paper: K = 4).")
    max_sets_per_user: int = Field(20, ge=1, description="Most disjoint shot sets per user (paper: 20).")
    min_pairs_per_user: int = Field(
        8, ge=1, description="Users with fewer usable pairs are left out (with the reason in users.parquet)."
    )
    unseen_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Fraction of eligible users held out of training (chosen by a stable hash of the user id).",
    )
    heldout_pairs_per_user: int = Field(
        4, ge=0, description="Seen users: pairs kept out of shots and training, for evaluation."
    )
    unseen_shot_sets: int = Field(
        2, ge=1, description="Unseen users: shot sets drawn (the rest of their pairs are evaluation pairs)."
    )


class EmbedderSpec(Section):
    """One embedder of the `embed` stage."""

    name: SafeName = Field(
        description="Unique label, used in tables and as the key of its embedding shards (a safe file name)."
    )
    kind: Literal[
        "vlm", "clip_diff", "encoder", "true_preference", "true_attribute_diff", "true_posterior"
    ] = Field(
        description="vlm: a transformers image-text-to-text model (the paper's); clip_diff: open_clip mean(preferred - "
        "dispreferred) image features; encoder: the few-shot preference encoder trained by the `encoder` stage "
        "(configured in the encoder section); true_*: the synthetic world's references (toy runs only)."
    )
    model: str | None = Field(
        None,
        description="Hub id or local directory (open_clip: a model name, 'local-dir:DIR' or a directory). "
        "None: the tiny offline default built once per run root by the tiny_models stage.",
    )
    readout: Literal["generate", "prefill", "image_diff"] = Field(
        "image_diff",
        description="vlm only. generate: greedy decoding, hidden states at the last generated token (paper); "
        "prefill: hidden states at the last prompt token (no decoding); image_diff: each image's tokens pooled, "
        "preferred minus dispreferred, averaged over the shots.",
    )
    layers: tuple[int, ...] | None = Field(
        None,
        description="vlm only: hidden-state rows to keep (0 = embeddings, -1 = last layer); None keeps all.",
    )
    layer_pooling: Literal["none", "mean"] = Field(
        "none", description="vlm only: keep the selected rows as a sequence (none) or average them (mean)."
    )
    max_new_tokens: int = Field(
        64, ge=1, description="vlm generate: token budget of the greedy profile (paper: 1024 on a 7B model)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Model dtype.")


def _default_embedders() -> tuple[EmbedderSpec, ...]:
    # the paper's prefill/generate read-outs are diagnostics offline (a random VLM cannot read them): they
    # run in configs/toy_readouts.yaml, not in the default list
    return (
        EmbedderSpec(name="encoder", kind="encoder"),
        EmbedderSpec(name="vlm-image_diff", kind="vlm", readout="image_diff"),
        EmbedderSpec(name="clip-diff", kind="clip_diff"),
        EmbedderSpec(name="true-preference", kind="true_preference"),
        EmbedderSpec(name="true-attribute-diff", kind="true_attribute_diff"),
    )


class TinyModelsConfig(Section):
    """The tiny offline default models (random weights, built from configs, saved and reloaded like real ones)."""

    seed: int = Field(0, description="Seed of the tiny models' weights and tokenizer training.")
    vlm_image_size: int = Field(64, ge=16, description="Tiny VLM vision input side (pixels).")
    vlm_patch_size: int = Field(16, ge=2, description="Tiny VLM vision patch side.")
    vlm_hidden: int = Field(128, ge=16, description="Tiny VLM language model width.")
    vlm_layers: int = Field(2, ge=1, description="Tiny VLM language model layers.")
    vlm_vocab: int = Field(600, ge=300, description="Byte-level BPE vocabulary size of the tiny tokenizer.")
    clip_image_size: int = Field(64, ge=16, description="Tiny open_clip image side.")
    clip_embed_dim: int = Field(64, ge=8, description="Tiny open_clip embedding width.")


class EmbedConfig(Section):
    """The `embed` stage: user preference embeddings for every shot set, one shard series per embedder."""

    embedders: tuple[EmbedderSpec, ...] = Field(
        default_factory=_default_embedders, description="Embedders to run; each writes its own shards."
    )
    default: str = Field("encoder", description="The embedder whose vectors condition training.")
    batch_size: int = volatile(16, "Shot sets per forward batch.", ge=1)
    shard_sets: int = volatile(256, "Shot sets per output shard (a shard completes atomically).", ge=1)
    device: str = volatile("auto", "Torch device: auto (cuda when available), cpu, cuda, cuda:1, ...")
    shard_workers: int = volatile(
        1,
        "Shards computed at once by the orchestrator's task runner (1 on a small CPU: torch already uses the cores).",
        ge=1,
    )

    @model_validator(mode="after")
    def _check_names(self) -> EmbedConfig:
        names = [e.name for e in self.embedders]
        if len(set(names)) != len(names):
            raise ValueError(f"embedder names must be unique, got {names}")
        if self.default not in names:
            raise ValueError(f"default embedder {self.default!r} is not among {names}")
        return self


class FeatureSourceSpec(Section):
    """Frozen per-image features that the preference encoder reads (computed once per image, cached)."""

    kind: Literal["vlm", "open_clip"] = Field(
        "vlm",
        description="vlm: a transformers image-text-to-text model's projected image tokens (the tokens the language "
        "model reads), pooled to a grid; open_clip: open_clip image features (encode_image).",
    )
    model: str | None = Field(
        None,
        description="Hub id or local directory (open_clip: a model name, 'local-dir:DIR' or a directory). None: the "
        "tiny offline default built by the tiny_models stage.",
    )
    grid: int = Field(
        4,
        ge=1,
        description="vlm only: the base image's token grid is average-pooled to grid x grid cells and flattened "
        "(1 = mean over all tokens; more cells keep where things are in the image).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Model dtype.")


class EncoderConfig(Section):
    """The `encoder` stage: a few-shot preference encoder trained on seen users' labels (VPL/LoRe style).

    A reward basis g maps image features to z_dim numbers; a user vector z scores an image as z . g(image).
    The basis is first fitted as a low-rank Bradley-Terry model with one free vector per training user; then
    the encoder (pair encoder over (g(preferred), g(dispreferred), their difference), set pooling over the K
    pairs, an MLP to z) learns to predict the same user's other pairs from a freshly resampled K-shot context.
    """

    features: FeatureSourceSpec = Field(
        default_factory=FeatureSourceSpec, description="Per-image feature source."
    )
    seed: int = Field(0, description="Seed of initialisation, user split, contexts and targets.")
    members: int = Field(
        1,
        ge=1,
        description="Encoders trained independently (seeds seed, seed+1, ...: each its own user split and "
        "initialisation), their user vectors side by side (z has members x z_dim numbers) and their rewards "
        "summed. Averages out the seed-to-seed spread of the reward basis; mean pooling only.",
    )
    z_dim: int = Field(6, ge=1, description="Width of the user vector z (and of the reward basis).")
    hidden: int = Field(64, ge=4, description="Width of the pair encoder and set pooling.")
    pair_encoder: Literal["difference", "linear", "mlp"] = Field(
        "linear",
        description="Pair encoder over (g(preferred), g(dispreferred), difference): linear (z is then a linear "
        "read of the pooled pairs, which is what carried over to unseen users best) or a two-layer MLP; "
        "difference: linear over g(preferred) - g(dispreferred) alone (z an affine map of the mean basis "
        "difference of the K pairs).",
    )
    pooling: Literal["mean", "attention"] = Field(
        "mean",
        description="Permutation-invariant pooling over the K pairs: mean, or attention with a learned query.",
    )
    variational: bool = Field(
        False,
        description="Predict a Gaussian over z (mean and log-variance) and add a KL term; embeddings are the mean.",
    )
    kl_weight: float = Field(1e-3, ge=0, description="Weight of the KL term (variational only).")
    basis_steps: int = Field(1500, ge=1, description="Full-batch steps of the low-rank basis fit.")
    basis_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the basis fit.")
    basis_l2: float = Field(
        3e-3, ge=0, description="L2 penalty on the basis weights and the per-user vectors."
    )
    steps: int = Field(2000, ge=1, description="Encoder optimizer steps.")
    users_per_step: int = Field(64, ge=1, description="Users drawn per step (each with its own context).")
    targets_per_user: int = Field(8, ge=1, description="Target pairs per drawn user (never in its context).")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the encoder.")
    weight_decay: float = Field(1e-3, ge=0, description="AdamW weight decay of the encoder.")
    validation_fraction: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Share of seen users held out to pick the checkpoint (by held-out pair accuracy).",
    )
    validation_contexts: int = Field(4, ge=1, description="Contexts drawn per validation user.")
    validate_every: int = Field(100, ge=1, description="Steps between validations (the best one is kept).")
    checkpoint_every: int = volatile(250, "Steps between resumable checkpoints.", ge=1)
    feature_batch: int = volatile(128, "Images per feature-extraction batch.", ge=1)
    device: str = volatile("auto", "Torch device: auto (cuda when available), cpu, cuda, cuda:1, ...")

    @model_validator(mode="after")
    def _check_members(self) -> EncoderConfig:
        if self.members > 1 and self.pooling != "mean":
            raise ValueError(
                "encoder.members > 1 needs pooling: mean (attention pools cannot be placed side by side)"
            )
        return self


class ProbeConfig(Section):
    """The `probe` stage: user identification from frozen embeddings (paper's MLP) vs nearest centroid and chance."""

    seed: int = Field(0, description="Seed of the probe's initialisation and batches.")
    hidden: int = Field(512, ge=1, description="MLP width (paper: 512).")
    blocks: int = Field(4, ge=0, description="Residual blocks (paper: 4).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the residual blocks.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay.")
    epochs: int = Field(
        10,
        ge=1,
        description="Training epochs (the paper's value; 30 gave the same accuracies here in twice the time).",
    )
    batch_size: int = Field(64, ge=1, description="Batch size.")
    test_sets_per_user: int = Field(
        1, ge=1, description="Held-out shot sets per seen user (the rest train the probe)."
    )
    topk: tuple[int, ...] = Field((1, 4, 16), description="Top-k accuracies to report.")
    rows: Literal["all", "last"] = Field(
        "all",
        description="Multi-row embeddings (VLM hidden states): probe all rows flattened, or only the last row "
        "(the paper's probe reads emb[-1]; use it for large VLMs).",
    )
    pair_rank: int = Field(
        6,
        ge=1,
        description="Pair diagnostics: width of the Bradley-Terry probe's reward basis and user vector.",
    )
    pair_steps: int = Field(800, ge=1, description="Pair diagnostics: full-batch Adam steps per fit.")
    pair_lr: float = Field(1e-2, gt=0, description="Pair diagnostics: Adam learning rate.")
    pair_l2: float = Field(
        3e-3, ge=0, description="Pair diagnostics: L2 penalty on the basis and the user read-out."
    )


class BackboneConfig(Section):
    """The text-to-image model the user adapter is added to (the design)."""

    kind: Literal["toy", "sd", "cascade"] = Field(
        "toy",
        description="toy: tiny pixel-space UNet pretrained by the `pretrain` stage; sd: any diffusers Stable "
        "Diffusion 1.x/2.x/XL checkpoint; cascade: the Stable Cascade prior (the paper's backbone).",
    )
    model: str | None = Field(
        None, description="Hub id or local directory (sd, cascade). toy: None (the pretrain output)."
    )
    resolution: int = Field(16, ge=8, description="Training and sampling resolution in pixels.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="auto: what the checkpoint's scheduler says (the toy backbone uses v_prediction)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Frozen-weight dtype.")
    effnet: str | None = Field(
        None,
        description="cascade: Stable Cascade's EfficientNet encoder for Stage-C training latents, a local "
        "safetensors file or 'hub_repo/path/in/repo'. None: effnet_encoder.safetensors in a local model "
        "directory, else stabilityai/stable-cascade/effnet_encoder.safetensors. Unused by toy and sd.",
    )
    decoder: str | None = Field(
        None,
        description="cascade: Stages B/A that turn Stage-C latents into images (evaluate, ppd generate), a hub "
        "id or local directory in the stabilityai/stable-cascade layout. None: decoder_pipeline/ inside a "
        "local model directory, else stabilityai/stable-cascade for a hub prior. Unused by toy and sd.",
    )


class PretrainConfig(Section):
    """The `pretrain` stage: the toy backbone trained from scratch on the ingested images (toy runs only)."""

    seed: int = Field(0, description="Seed of initialisation, batches and noise.")
    steps: int = Field(
        600,
        ge=1,
        description="Optimizer steps (measured on 2 cores at widths (16, 32), about 0.25 s per 64-image step; at "
        "(32, 64) 600 steps drew the caption's colour 99% of the time and 300 steps only 40% at lr 1e-3, 85% at 3e-3, "
        "so the demo keeps 600 and narrows the UNet instead, see block_out_channels).",
    )
    batch_size: int = Field(64, ge=1, description="Images per step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the weights; the EMA weights are saved.")
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of empty captions (enables classifier-free guidance)."
    )
    block_out_channels: tuple[int, ...] = Field(
        (16, 32),
        description="UNet widths per resolution level (multiples of 8, its attention heads). (16, 32) halves every "
        "UNet pass against (32, 64) (pretraining 0.25 s per step against 0.6, training and sampling alike) with the "
        "same new-user figures on three worlds; its samples are less faithful (colour 90% against 99%, objects "
        "larger), which lowers the true-vector ceiling and seen users' win rate a little. Set [32, 64] for those.",
    )
    cross_attention_dim: int = Field(
        64, ge=8, description="Text (and user-token) width seen by cross-attention."
    )
    text_layers: int = Field(2, ge=1, description="Tiny CLIP text encoder layers.")
    num_train_timesteps: int = Field(
        1000, ge=10, description="Diffusion steps of the noise schedule (cosine)."
    )


class AdapterConfig(Section):
    """The user adapter: embedding -> N user tokens + decoupled key/value in every cross-attention."""

    num_tokens: int = Field(
        4,
        ge=1,
        description="User tokens (4 matches diffusers' IP-Adapter ImageProjection layout, so SD exports load with load_ip_adapter).",
    )
    rows: Literal["all", "last", "mean"] = Field(
        "all",
        description="Multi-row embeddings (VLM hidden states): flatten all rows, take the last, or average them.",
    )
    scale: float = Field(
        1.0, ge=0, description="Branch scale during training (lambda in the paper's notation)."
    )
    embedding_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of training pairs whose user is replaced by the null user."
    )


BETA_DPO_DEFAULTS = {"toy": 100.0, "sd": 2500.0, "cascade": 2500.0}


class TrainConfig(Section):
    """The `train` stages: user-conditioned Diffusion-DPO (ppd) and the dpo / sft baselines, through DeepSpeed."""

    trainers: tuple[Literal["ppd", "dpo", "sft"], ...] = Field(
        ("ppd", "dpo"),
        description="ppd: DPO conditioned on each pair's user embedding; dpo: population DPO (same adapter, one constant "
        "embedding); sft: same adapter and constant embedding, denoising loss on winners only (a second population "
        "baseline that no headline reads, so off by default; configs/toy_readouts.yaml turns it on).",
    )
    ceiling_embedder: str | None = Field(
        "true-preference",
        description="Also train a ppd model (stage train_ppd_true, model ppd_true) conditioned on this embedder: "
        "by default the user's true preference vector, the ceiling every real embedder is reported against. Any "
        "embedder of embed.embedders (skipped when it is not listed, or is a synthetic-world reference on real data). "
        "None: skip it.",
    )
    shots_ceiling_embedder: str | None = Field(
        "true-attribute-diff",
        description="Also train a ppd model (stage train_ppd_shots, model ppd_shots) conditioned on this embedder: "
        "by default the world's true attribute differences of the same K shots, the K-shot ceiling (true-posterior, "
        "the Bayes posterior given those shots, is the stricter limit). Any embedder of embed.embedders (skipped "
        "when it is not listed, or is a synthetic-world reference on real data). None: skip it.",
    )
    seed: int = Field(0, description="Seed of initialisation, data order, noise and timesteps.")
    conditioning: Literal["shot_set", "user_mean", "user_subset"] = Field(
        "user_mean",
        description="What a training pair of a user-conditioned trainer reads: user_mean, the mean embedding of all "
        "its user's shot sets except the one that contains it (a less noisy reading of the user, as seen users are "
        "evaluated); shot_set, the embedding of one of its user's K-shot sets that does not contain it (chosen by "
        "the fewshot stage); user_subset, the mean of that set and k - 1 more of the user's other sets, k uniform "
        "and the sets drawn per pair by train.seed (both readings in one training). New users are read from one "
        "K-shot set either way.",
    )
    steps: int = Field(
        200, ge=1, description="Optimizer steps (200 x 16 pairs on the toy world keeps make demo in budget)."
    )
    pairs_per_step: int = Field(
        16, ge=1, description="Pairs per optimizer step over all ranks (divisible by the world size)."
    )
    lr: float = Field(
        3e-3,
        gt=0,
        description="AdamW learning rate of the adapter (3e-3 with beta 100 at 16 px gave a visible per-user shift).",
    )
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then constant.")
    beta_dpo: float | None = Field(
        None,
        description="DPO beta in the folded convention (0.5 x Salesforce's). None: the backbone's default "
        f"{BETA_DPO_DEFAULTS} (pixel-space MSE differences are far smaller than SD-latent ones).",
    )
    zero_stage: Literal[0, 1, 2] = Field(
        2, description="DeepSpeed ZeRO stage (deploy/deepspeed/zero<stage>.json)."
    )
    launcher: Literal["deepspeed", "torchrun"] = Field(
        "deepspeed", description="Process launcher for the DeepSpeed engine."
    )
    num_gpus: int = volatile(1, "Processes per node (GPUs, or CPU ranks with gloo).", ge=1)
    hostfile: str | None = volatile(None, "DeepSpeed hostfile for several nodes (deploy/hostfile.example).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision (bf16 on GPUs)."
    )
    checkpoint_every: int = volatile(100, "Steps between checkpoints.", ge=1)
    keep_checkpoints: int = volatile(2, "Complete checkpoints kept (older ones are rotated out).", ge=1)
    log_every: int = volatile(10, "Steps between metric lines (JSONL and TensorBoard).", ge=1)
    validate_every: int = volatile(
        100, "Steps between validation grids and held-out implicit accuracy.", ge=1
    )
    validation_users: int = volatile(2, "Users (rows) in validation grids.", ge=1)
    validation_prompts: int = volatile(4, "Prompts (columns) in validation grids.", ge=1)
    heldout_pairs: int = volatile(
        256, "Held-out pairs scored for implicit accuracy at each validation.", ge=1
    )
    resume: Literal["latest", "never"] = volatile(
        "latest", "latest: continue from the newest complete checkpoint."
    )


class RewardSpec(Section):
    """One reward model: scores (image, prompt) pairs; higher is better."""

    name: SafeName = Field(
        description="Unique label, used in tables, plots and file names (a safe file name)."
    )
    kind: Literal[
        "oracle", "oracle_attribute", "pickscore", "hps", "aesthetic", "clip_score", "image_reward"
    ] = Field(
        description="oracle: the synthetic world's user reward (per user); oracle_attribute: one z-scored world attribute; "
        "pickscore / hps (v2, v2.1) / aesthetic (LAION v2) / clip_score / image_reward: real reward models."
    )
    model: str | None = Field(
        None,
        description="Weights: local dir or file, or hub id (pickscore, clip_score: a CLIP model; hps: checkpoint file; "
        "aesthetic: the MLP file). None: the tiny offline weights built by the tiny_models stage.",
    )
    processor: str | None = Field(
        None,
        description="Processor / tokenizer / CLIP backbone the weights expect (None: the reward's own default).",
    )
    attribute: str | None = Field(
        None, description="oracle_attribute: which world attribute (e.g. brightness)."
    )
    sha256: str | None = Field(
        None, description="Expected sha256 of the weight file (None: the published digest when one is known)."
    )

    @property
    def reads_world(self) -> bool:
        """Scored from the synthetic world (oracle, one attribute), not from weights."""
        return self.kind in ("oracle", "oracle_attribute")

    @property
    def uses_tiny_weights(self) -> bool:
        """A model reward without ``model`` loads the tiny offline weights of the tiny_models stage (ImageReward
        has none: it loads its released checkpoint)."""
        return not self.reads_world and self.kind != "image_reward" and self.model is None


class JudgeSpec(Section):
    """One judge: given a user's 4 shots and a pair of images, which one would this user prefer."""

    name: SafeName = Field(description="Unique label (a safe file name).")
    kind: Literal["oracle", "reward", "vlm"] = Field(
        description="oracle: the world's user reward; reward: a reward model's score; vlm: a VLM asked the paper's question "
        "(the user's 4 shots in random order, the query pair in both orders, a win only when both answers agree)."
    )
    reward: str | None = Field(None, description="reward judges: the name of an entry of evaluate.rewards.")
    model: str | None = Field(
        None, description="vlm judges: local dir or hub id (None: the tiny offline VLM)."
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Most comparisons per (group, model, baseline) and held-out pairs this judge sees (a seeded "
        "subset; VLM judges are slow). None: all.",
    )


def _default_rewards() -> tuple[RewardSpec, ...]:
    return (
        RewardSpec(name="oracle", kind="oracle"),
        RewardSpec(name="brightness", kind="oracle_attribute", attribute="brightness"),
        RewardSpec(name="saturation", kind="oracle_attribute", attribute="saturation"),
        RewardSpec(name="size", kind="oracle_attribute", attribute="size"),
        RewardSpec(name="clip-score", kind="clip_score"),
        RewardSpec(name="aesthetic", kind="aesthetic"),
    )


def _default_judges() -> tuple[JudgeSpec, ...]:
    return (
        JudgeSpec(name="oracle", kind="oracle"),
        JudgeSpec(name="aesthetic", kind="reward", reward="aesthetic"),
        JudgeSpec(name="vlm", kind="vlm", limit=16),
    )


class EvaluateConfig(Section):
    """The `evaluate` stage: generation on held-out prompts, rewards, judges, win rates, interpolation, report."""

    seed: int = Field(0, description="Seed of user/prompt selection, judge shot order and bootstrap.")
    seen_users: int = Field(24, ge=1, description="Most seen users evaluated (those with held-out prompts).")
    unseen_users: int = Field(
        24, ge=1, description="Most unseen users evaluated (each given one 4-pair shot set)."
    )
    prompts_per_user: int = Field(4, ge=1, description="Held-out prompts per user.")
    seeds_per_prompt: int = Field(
        1, ge=1, description="Seeds per prompt; every model uses the same prompt and seed."
    )
    steps: int = Field(20, ge=1, description="Sampler steps (DDIM).")
    guidance: float = Field(3.0, ge=1, description="Classifier-free guidance on the caption (and user).")
    user_guidance: float = Field(
        0.0, ge=0, description="Extra guidance on the user tokens (user-CFG; 0 = off)."
    )
    scale: float = Field(1.0, ge=0, description="Adapter scale at inference.")
    seen_embedding: Literal["mean", "first"] = Field(
        "mean",
        description="A seen user's conditioning embedding: the mean over all their shot sets (the model trained on "
        "them all) or their first shot set only. Unseen users always get one 4-pair set.",
    )
    rewards: tuple[RewardSpec, ...] = Field(default_factory=_default_rewards, description="Reward models.")
    judges: tuple[JudgeSpec, ...] = Field(default_factory=_default_judges, description="Judges.")
    primary_judge: str = Field("oracle", description="The judge whose win rates headline the report.")
    bootstrap: int = Field(
        1000, ge=10, description="Bootstrap resamples (over users) for win-rate intervals."
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval level.")
    interpolation_alphas: tuple[float, ...] = Field(
        (0.0, 0.25, 0.5, 0.75, 1.0),
        description="Weights a of u = a*u_A + (1-a)*u_B in the interpolation study.",
    )
    interpolation_prompts: int = Field(
        8, ge=1, description="Prompts (one seed each) per interpolation weight."
    )
    agreement_pairs: int = Field(
        256,
        ge=1,
        description="Held-out labelled pairs on which each judge's agreement with the user is measured.",
    )
    batch_size: int = volatile(64, "Images per sampler batch.", ge=1)

    @model_validator(mode="after")
    def _check_names(self) -> EvaluateConfig:
        rewards = [r.name for r in self.rewards]
        if len(set(rewards)) != len(rewards):
            raise ValueError(f"evaluate.rewards names must be unique, got {rewards}")
        for j in self.judges:
            if j.kind == "reward" and j.reward not in rewards:
                raise ValueError(f"judge {j.name!r} names reward {j.reward!r}, not one of {rewards}")
        if self.primary_judge not in [j.name for j in self.judges]:
            raise ValueError(f"evaluate.primary_judge {self.primary_judge!r} is not one of the judges")
        return self


class RelabelConfig(Section):
    """The `relabel` stage: reward models as users (the multi-reward experiment, the design)."""

    rewards: tuple[str, ...] = Field(
        ("brightness", "saturation", "size"),
        description="Names of evaluate.rewards entries that become users: each relabels a sample of ingested pairs "
        "by its own score (on the synthetic world the attribute rewards stand in for CLIP score, aesthetic and HPS). "
        "Rewards the environment lacks (no synthetic world, ImageReward not installed) are skipped and recorded.",
    )
    rows_per_reward: int = Field(
        150, ge=1, description="Ingested pairs drawn and relabelled per reward (ties dropped)."
    )
    seed: int = Field(0, description="Seed of the pair sample and of the reward users' ids.")
    device: str = volatile(
        "auto", "Torch device of the reward models: auto (cuda when available), cpu, cuda, ..."
    )


class PPDConfig(Section):
    """The whole pipeline's configuration."""

    config_version: int = Field(CONFIG_VERSION, description="Version of this config layout.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run root and global knobs.")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="Synthetic world (used when ingest.source is unset)."
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Ingestion.")
    relabel: RelabelConfig = Field(default_factory=RelabelConfig, description="Reward models as users.")
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig, description="Few-shot sampling.")
    tiny_models: TinyModelsConfig = Field(
        default_factory=TinyModelsConfig, description="Tiny offline default models."
    )
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="User preference embeddings.")
    encoder: EncoderConfig = Field(
        default_factory=EncoderConfig,
        description="Few-shot preference encoder (the `encoder` embedder kind).",
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="User-identification probe.")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="Text-to-image backbone.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Toy backbone pretraining.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="User adapter.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training (ppd, dpo, sft).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation and report.")

    @model_validator(mode="after")
    def _check_version(self) -> PPDConfig:
        if self.config_version != CONFIG_VERSION:
            raise ValueError(
                f"config_version {self.config_version} is not supported (this code reads {CONFIG_VERSION})"
            )
        return self

    @model_validator(mode="after")
    def _check_reward_users(self) -> PPDConfig:
        specs = {r.name: r for r in self.evaluate.rewards}
        names = list(self.relabel.rewards)
        if len(set(names)) != len(names):
            raise ValueError(f"relabel.rewards names must be unique, got {names}")
        for name in names:
            if name not in specs:
                raise ValueError(f"relabel.rewards names {name!r}, not one of evaluate.rewards {list(specs)}")
            if specs[name].kind == "oracle":
                raise ValueError(
                    f"relabel.rewards names {name!r}, the per-user oracle: a reward user needs a reward that "
                    "scores an image the same for everyone"
                )
        return self

    def relabel_rewards(self) -> tuple[RewardSpec, ...]:
        """The RewardSpecs of ``relabel.rewards``, in that order."""
        specs = {r.name: r for r in self.evaluate.rewards}
        return tuple(specs[name] for name in self.relabel.rewards)


# --------------------------------------------------------------------------------------------- loading


def _deep_merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _nested(dotted: str, value: Any) -> dict:
    keys = [k for k in dotted.split(".") if k]
    if not keys:
        raise ConfigError(f"empty config key in override {dotted!r}")
    out: dict = value
    for key in reversed(keys):
        out = {key: out}
    return out


def _parse_value(text: str) -> Any:
    """YAML scalar rules: 3 -> int, 0.5 -> float, true -> bool, [a, b] -> list, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``["train.beta=2500", "world.num_users=8"]`` -> nested dict."""
    merged: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key.path=value")
        key, value = pair.split("=", 1)
        merged = _deep_merge(merged, _nested(key.strip(), _parse_value(value)))
    return merged


def env_overrides(environ: Mapping[str, str] | None = None) -> dict:
    """``PPD_FEWSHOT__SEED=3`` -> {"fewshot": {"seed": 3}}. ``PPD_CONFIG`` (the preset path) is skipped."""
    environ = os.environ if environ is None else environ
    merged: dict = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "PPD_CONFIG":
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        merged = _deep_merge(merged, _nested(dotted, _parse_value(value)))
    return merged


def _set_at(data: Any, loc: Sequence[Any]) -> tuple[Any, ...] | None:
    """The part of ``loc`` at which ``data`` sets a value (``loc`` itself, or a parent whose value, such as
    a whole list, replaces what lower layers had below it); None when ``data`` sets nothing there."""
    for depth, key in enumerate(loc):
        if not isinstance(data, Mapping):
            return tuple(loc[:depth])
        if key not in data:
            return None
        data = data[key]
    return tuple(loc)


def _source_of(loc: Sequence[Any], layers: Sequence[tuple[str, Mapping]]) -> str:
    """Where the value at ``loc`` came from: the highest-precedence layer that set it."""
    for name, data in reversed(layers[1:]):
        at = _set_at(data, loc) if loc else None
        if not at:
            continue
        if name == "--set":
            return "--set " + ".".join(str(k) for k in at)
        if name == "env":
            return ENV_PREFIX + "__".join(str(k) for k in at).upper()
        return name
    return layers[0][0]


def _format_validation_error(err: ValidationError, layers: Sequence[tuple[str, Mapping]]) -> str:
    """One line per problem, each naming the key and where its value came from (a --set override, a
    PPD_* variable, the preset file or the defaults)."""
    lines = ["invalid configuration:"]
    for item in err.errors():
        loc = item["loc"]
        key = ".".join(str(p) for p in loc) or "<root>"
        source = _source_of(loc, layers)
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (from {source})")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, Mapping) else f" (got {got!r})"
            lines.append(f"  {key}: {item['msg']}{shown} (from {source})")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping = (),
    environ: Mapping[str, str] | None = None,
) -> PPDConfig:
    """Resolve defaults < YAML preset < PPD_* environment < overrides into one validated config."""
    layers: list[tuple[str, Mapping]] = [("defaults", {})]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        layers.append((str(path), loaded))
    layers.append(("env", env_overrides(environ)))
    given = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    layers.append(("--set", given))
    data: dict = {}
    for _, layer in layers:
        data = _deep_merge(data, layer)
    try:
        return PPDConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, layers)) from None


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------- fingerprint


def stable_fields(section: BaseModel) -> dict:
    """The section as JSON data without volatile fields (recursively)."""
    out: dict = {}
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("volatile"):
            continue
        value = getattr(section, name)
        out[name] = stable_fields(value) if isinstance(value, BaseModel) else value
    return json.loads(json.dumps(out, default=str, sort_keys=True))


def digest_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def fingerprint(
    stage: str,
    section: BaseModel | Mapping | None,
    upstream: Mapping[str, str] | None = None,
    code_version: str = "1",
    extra: Mapping | None = None,
) -> str:
    """Name of a stage's output directory and its Prefect cache key.

    Built from the stage name, the result-relevant fields of its config section, the digests of
    the upstream manifests it reads, the stage's code version, and any ``extra`` identity (for
    instance a source listing). 16 hex characters of sha256.
    """
    section_data = stable_fields(section) if isinstance(section, BaseModel) else dict(section or {})
    return digest_json(
        {
            "stage": stage,
            "config": section_data,
            "upstream": dict(sorted((upstream or {}).items())),
            "code_version": code_version,
            "extra": dict(extra or {}),
        }
    )[:16]


def reference_markdown(model: type[BaseModel] = PPDConfig, prefix: str = "") -> str:
    """A Markdown table of every config key with its default and help text (the README's config table)."""
    rows = []

    def walk(cls: type[BaseModel], pre: str) -> None:
        for name, f in cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{pre}{name}.")
                continue
            default = f.get_default(call_default_factory=True)
            if isinstance(default, tuple) and default and isinstance(default[0], BaseModel):
                names = ", ".join(getattr(d, "name", "?") for d in default)
                rows.append(f"| `{pre}{name}` | {names} | {f.description or ''} |")
                walk(type(default[0]), f"{pre}{name}[].")
                continue
            shown = "required" if f.is_required() else f"`{json.dumps(default, default=str)}`"
            rows.append(f"| `{pre}{name}` | {shown} | {f.description or ''} |")

    walk(model, prefix)
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows])

"""Personalized generation: a trained run (or the base model), a user, prompts and seeds -> images.

A *model* is one of :data:`~ppd_core.compared.MODELS`: ``base`` (the backbone, user branch off), ``ppd`` (the adapter trained
on the default embedder's user embeddings), ``ppd_true`` and ``ppd_shots`` (the same trainer on the ceiling
embedders: by default the synthetic world's true preference vectors, and the true attribute differences of
the same K shots, the K-shot ceiling), and the baselines ``dpo`` / ``sft`` (the same adapter trained on one
constant embedding, so they ignore the user). The backbone is loaded once; each model's exported adapter
(``<train dir>/export/ip_adapter.safetensors``) is installed before it samples.

A *user* is either a user id of the ingested dataset (conditioned on that user's first shot set, or for a
seen user under ``evaluate.seen_embedding = "mean"`` on the mean of all their shot sets' embeddings) or a brand-new user: a Parquet file of their labelled pairs in the Pick-a-Pic v2
schema with images, ingested with the pipeline's own validation and embedded with the run's embedder.

Images depend only on (model, prompt, seed, user embedding, settings): every image's noise comes from its
own seed (:func:`ppd_core.models.sampling.sample`), and file names are ``p<prompt index>-s<seed>.png``, so
the outputs of two models for the same request pair up file by file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ppd_core.compared import COMPARED, MODELS  # noqa: F401 (MODELS: re-exported)
from ppd_core.config import PPDConfig
from ppd_core.data.fewshot import read_fewshot
from ppd_core.data.world_render import world_dir
from ppd_core.errors import InputError, StageError
from ppd_core.models.adapter import UserAdapter
from ppd_core.models.backbone import Backbone

# the compared models and the train stage each comes from (the one table: ppd_core.compared)
TRAIN_STAGE = {m.name: m.train_stage for m in COMPARED.values() if m.train_stage}


@dataclass(frozen=True)
class Settings:
    """Sampler settings shared by every compared model."""

    steps: int = 20
    guidance: float = 3.0
    user_guidance: float = 0.0
    scale: float = 1.0
    batch_size: int = 64

    @classmethod
    def from_config(cls, cfg: PPDConfig) -> Settings:
        e = cfg.evaluate
        return cls(e.steps, e.guidance, e.user_guidance, e.scale, e.batch_size)


def embedder_for(cfg: PPDConfig, model: str) -> str | None:
    """The embedder whose vectors condition ``model`` (None: it ignores the user)."""
    return COMPARED[model].embedder(cfg)


class ModelSet:
    """One backbone and the adapters of the trained runs; :meth:`generate` samples any of them."""

    def __init__(self, backbone: Backbone, adapters: Mapping[str, UserAdapter]):
        self.backbone = backbone
        self.adapters = dict(adapters)

    @classmethod
    def load(cls, cfg: PPDConfig, dirs: Mapping[str, Path], models: Sequence[str]) -> ModelSet:
        """``dirs``: stage -> output directory (``pretrain`` for the toy backbone, ``train_<x>`` per model)."""
        from ppd_core.models.export import export_dir, load_adapter
        from ppd_core.models.factory import load_backbone

        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise InputError(f"unknown model(s) {unknown}; models are {', '.join(MODELS)}")
        backbone = load_backbone(cfg.backbone, dirs.get("pretrain"))
        adapters = {}
        for model in models:
            if model == "base":
                continue
            stage = TRAIN_STAGE[model]
            if stage not in dirs:
                raise StageError(f"model {model!r} needs the {stage} stage's output")
            adapters[model] = load_adapter(export_dir(dirs[stage]), backbone).eval()
        return cls(backbone, adapters)

    @property
    def models(self) -> tuple[str, ...]:
        return ("base", *self.adapters)

    def embedding_shape(self, model: str) -> tuple[int, ...]:
        return tuple(self.adapters[model].embedding_shape)

    @torch.no_grad()
    def generate(
        self,
        model: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        embeddings: np.ndarray | None = None,
        settings: Settings = Settings(),
    ) -> np.ndarray:
        """uint8 (N, H, W, 3), one image per (prompt, seed). ``embeddings``: (N, *shape) or (*shape) for the
        user-conditioned models; ignored by ``base``; dpo/sft use their constant (zero) embedding."""
        from ppd_core.models.grids import to_uint8
        from ppd_core.models.sampling import sample

        s = settings
        if model == "base":
            images = sample(self.backbone, prompts, seeds, s.steps, s.guidance, batch_size=s.batch_size)
            return to_uint8(images)
        if model not in self.adapters:
            raise InputError(f"model {model!r} is not loaded (loaded: {', '.join(self.models)})")
        adapter = self.adapters[model]
        shape = tuple(adapter.embedding_shape)
        user_free = COMPARED[model].embedder_key is None  # dpo / sft: trained on one constant embedding
        if user_free or embeddings is None:
            if not user_free:
                raise InputError(f"model {model!r} needs user embeddings")
            emb = torch.zeros((len(prompts), *shape))  # the constant embedding these baselines trained on
        else:
            emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
            if tuple(emb.shape) == shape:
                emb = emb.unsqueeze(0).expand(len(prompts), *shape)
            if tuple(emb.shape[1:]) != shape or len(emb) != len(prompts):
                raise InputError(
                    f"model {model!r} takes embeddings of shape {shape}, got {tuple(emb.shape)} for {len(prompts)} prompts"
                )
        device = next(self.backbone.denoiser.parameters()).device
        self.backbone.install_adapter(adapter)
        try:
            tokens = adapter.tokens(emb.to(device))  # (N, T_u, D)
            images = sample(
                self.backbone,
                prompts,
                seeds,
                s.steps,
                s.guidance,
                user_tokens=tokens,
                user_scale=s.scale,
                user_guidance=s.user_guidance,
                batch_size=s.batch_size,
            )
        finally:
            self.backbone.uninstall_adapter()
        return to_uint8(images)


# --------------------------------------------------------------------------------------------- users


@dataclass(frozen=True)
class UserCondition:
    """A user as a model sees them: the shot set and its embedding (None for unconditioned models)."""

    user_id: int
    shot_set_id: str
    embedding: np.ndarray | None  # (*shape) float32


def user_conditions(
    embed_dir: Path, embedder: str, average: Collection[int] = ()
) -> dict[int, tuple[str, np.ndarray]]:
    """user id -> (shot set id, embedding): the user's first shot set (training's order; the set a judge is
    shown). For users in ``average`` (seen users under ``evaluate.seen_embedding = "mean"``) the embedding is
    the mean of all the user's shot-set embeddings: a seen user's preference estimated from every set the
    model was trained with, not from one 4-pair draw."""
    from ppd_core.embed.extract import read_embeddings

    table, emb = read_embeddings(Path(embed_dir), embedder)
    rows: dict[int, list[int]] = {}
    first: dict[int, str] = {}
    for i, (uid, sid) in enumerate(
        zip(table.column("user_id").to_pylist(), table.column("shot_set_id").to_pylist(), strict=True)
    ):
        rows.setdefault(int(uid), []).append(i)
        first.setdefault(int(uid), sid)
    average = set(average)
    return {
        uid: (first[uid], emb[idx].mean(axis=0).astype(emb.dtype) if uid in average else emb[idx[0]])
        for uid, idx in rows.items()
    }


def seen_users(fewshot_dir: Path) -> set[int]:
    """Users the trained models saw (fewshot's split "seen")."""
    from ppd_core.data.fewshot import SEEN

    users = read_fewshot(fewshot_dir, "users", columns=["user_id", "split"])
    return {
        int(u)
        for u, split in zip(
            users.column("user_id").to_pylist(), users.column("split").to_pylist(), strict=True
        )
        if split == SEEN
    }


def averaged_users(cfg: PPDConfig, fewshot_dir: Path) -> set[int]:
    """The users whose embedding is their shot sets' mean under ``evaluate.seen_embedding``."""
    return seen_users(fewshot_dir) if cfg.evaluate.seen_embedding == "mean" else set()


def known_user(embed_dir: Path, embedder: str | None, user_id: int, average: bool = False) -> UserCondition:
    if embedder is None:
        return UserCondition(int(user_id), "", None)
    table = user_conditions(embed_dir, embedder, {int(user_id)} if average else ())
    if int(user_id) not in table:
        raise InputError(f"user {user_id} has no shot set in this run's embeddings ({embedder})")
    sid, emb = table[int(user_id)]
    return UserCondition(int(user_id), sid, emb)


def shots_from_parquet(cfg: PPDConfig, path: Path, shots: int | None = None):
    """A brand-new user's labelled pairs (Pick-a-Pic v2 schema, images included) -> a :class:`ShotSet`.

    The file goes through the pipeline's own ingestion (schema check, quarantine, winner/loser
    orientation, ties dropped), then the first ``shots`` (default ``fewshot.shots``) pairs in time order
    form the set. Fewer usable pairs is an error naming the quarantine reasons."""
    from ppd_core.data.fewshot import shot_set_id
    from ppd_core.data.ingest import ingest
    from ppd_core.data.pickapic import resolve_source
    from ppd_core.embed.extract import to_shot_set

    k = shots or cfg.fewshot.shots
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--shots {path}: no such file")
    with tempfile.TemporaryDirectory(prefix="ppd-shots-") as tmp:
        out = Path(tmp) / "ingest"
        out.mkdir()
        counts = ingest(cfg.ingest.model_copy(update={"images": "required"}), resolve_source(str(path)), out)
        pairs = pq.read_table(out / "pairs").to_pylist() if (out / "pairs").exists() else []
        pairs = [p for p in pairs if p.get("winner_uid") and p.get("loser_uid")]
        pairs.sort(key=lambda p: (p["created_at"], p["pair_id"]))
        users = {int(p["user_id"]) for p in pairs}
        if len(pairs) < k:
            raise InputError(
                f"--shots {path}: {len(pairs)} usable labelled pair(s), {k} needed "
                f"(quarantined: {counts.get('quarantine_reasons', counts.get('quarantined'))})"
            )
        if len(users) > 1:
            raise InputError(f"--shots {path}: pairs of {len(users)} users; give one user's pairs")
        chosen = pairs[:k]
        row = {
            "shot_set_id": shot_set_id([p["pair_id"] for p in chosen]),
            "user_id": users.pop(),
            "split": "new",
            "pair_ids": [p["pair_id"] for p in chosen],
            "captions": [p["caption"] for p in chosen],
            "winner_uids": [p["winner_uid"] for p in chosen],
            "loser_uids": [p["loser_uid"] for p in chosen],
        }
        shot_set = to_shot_set(row, out)
        # the store caches by directory; load the images now, before the temporary directory goes
        for shot in shot_set.shots:
            shot.preferred.load()
            shot.dispreferred.load()
        return shot_set


def new_user(cfg: PPDConfig, dirs: Mapping[str, Path], embedder: str | None, path: Path) -> UserCondition:
    """Embed a brand-new user's pairs with ``embedder`` (the one the model was trained on)."""
    from ppd_core.embed.extract import EmbedInputs, load_embedder

    shot_set = shots_from_parquet(cfg, path)
    if embedder is None:
        return UserCondition(shot_set.user_id, shot_set.shot_set_id, None)
    spec = next((e for e in cfg.embed.embedders if e.name == embedder), None)
    if spec is None:
        raise InputError(f"embedder {embedder!r} is not in embed.embedders")
    if spec.kind == "true_preference":
        raise InputError(
            "the ppd_true model is conditioned on the synthetic world's true preference vectors, which a new "
            "user's pairs do not give; use --model ppd"
        )
    inputs = EmbedInputs(
        dirs.get("fewshot"), dirs.get("ingest"), dirs.get("tiny_models"), world_dir(dirs), dirs.get("encoder")
    )
    # a new user's image uids name no image of this run: their features come from the pixels, never a cache
    shots = tuple(replace(s, preferred_uid="", dispreferred_uid="") for s in shot_set.shots)
    out = load_embedder(spec, inputs, cfg.embed.device).embed([replace(shot_set, shots=shots)])
    return UserCondition(shot_set.user_id, shot_set.shot_set_id, out.embeddings[0].numpy().astype(np.float32))


# --------------------------------------------------------------------------------------------- output


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}-s{seed}.png"


def request_grid(
    prompts: Sequence[str], seeds_per_prompt: int, first_seed: int = 0
) -> tuple[list, list, list]:
    """(prompt indices, prompts, seeds) for every prompt x seed, prompt-major."""
    idx = [i for i in range(len(prompts)) for _ in range(seeds_per_prompt)]
    seeds = [first_seed + j for _ in prompts for j in range(seeds_per_prompt)]
    return idx, [prompts[i] for i in idx], seeds


def check_out_dir(out_dir: Path) -> Path:
    """``out_dir`` made absolute, if writing there destroys nothing the project did not write: it is absent, an
    empty directory, or an earlier output of :func:`write_images` (a ``generate`` manifest listing every file
    it holds), which is replaced whole. Anything else is an :class:`InputError` and is left untouched."""
    from ppd_core.manifest import MANIFEST_NAME, load_manifest

    out_dir = Path(out_dir).expanduser().resolve()
    if not out_dir.exists():
        return out_dir
    if not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; give a new or empty directory")
    held = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*"))
    if not held:
        return out_dir
    manifest = load_manifest(out_dir)
    if manifest is None or manifest.stage != "generate":
        raise InputError(
            f"--out {out_dir} is not empty and is not an earlier `ppd generate` output (no generate "
            f"{MANIFEST_NAME}); it would be replaced, so give a new or empty directory"
        )
    foreign = [f for f in held if f != MANIFEST_NAME and f not in manifest.files]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"--out {out_dir} is an earlier `ppd generate` output but also holds files it did not write "
            f"({shown}); move them away or give another directory"
        )
    return out_dir


def write_images(
    out_dir: Path, images: np.ndarray, prompt_index: Sequence[int], seeds: Sequence[int], request: dict
) -> dict:
    """Write ``p<i>-s<seed>.png`` files and a manifest atomically to ``out_dir``. An earlier output of this
    function there is replaced as a whole; any other non-empty directory is refused (:func:`check_out_dir`)."""
    from ppd_core.manifest import commit

    out_dir = check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        rows = []
        for img, i, seed in zip(images, prompt_index, seeds, strict=True):
            name = image_name(i, seed)
            Image.fromarray(img).save(partial / name)
            rows.append(
                {"file": name, "prompt_index": int(i), "prompt": request["prompts"][i], "seed": int(seed)}
            )
        (partial / "images.json").write_text(json.dumps(rows, indent=1) + "\n")
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:16]
        check_out_dir(out_dir)  # again just before the swap: nothing foreign arrived while sampling
        manifest = commit(
            partial,
            out_dir,
            stage="generate",
            fingerprint=digest,
            code_version="1",
            config=request,
            upstream={},
            counts={"images": len(rows), "prompts": len(request["prompts"])},
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"directory": str(out_dir), "images": len(rows), "digest": manifest.digest}

"""The `embed` stage: batched, sharded extraction of user preference embeddings.

For each configured embedder the shot sets (sorted by user, then set index) are cut into shards of
``embed.shard_sets`` sets; each shard is one Parquet file written atomically (tmp + rename) into the
stage's partial directory, so a killed run resumes without recomputing finished shards. Embeddings
are keyed by the content hash of their shot set (``shot_set_id``): before computing, earlier complete
`embed` outputs with the *same embedder identity* are indexed, and any shot set found there is
copied instead of recomputed, so new data (new users, new partitions) computes only new sets.

Shard layout (``<embed_dir>/<embedder>/shard-00000.parquet``): user_id, shot_set_id, split,
set_index, pair_ids, embedding (fixed-size list<float32>; its shape and dtype in the schema
metadata), profile (generated text or null), embedder_model_id, embedder_digest.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ppd_core.config import EmbedConfig, EmbedderSpec
from ppd_core.data.fewshot import read_fewshot
from ppd_core.data.images import ingest_images
from ppd_core.embed.base import Embedder, Shot, ShotSet
from ppd_core.embed.reference import REFERENCE_EMBEDDERS
from ppd_core.errors import StageError
from ppd_core.manifest import is_complete, load_manifest
from ppd_core.weights import resolve_device

Progress = Callable[[int, int], None]
MapFn = Callable[[Callable, Sequence], Iterable]
WORLD_KINDS = tuple(REFERENCE_EMBEDDERS)  # the synthetic world's reference kinds (skipped on real data)
MODEL_KINDS = ("vlm", "clip_diff")


@dataclass(frozen=True)
class EmbedInputs:
    """Directories the stage reads (all absolute)."""

    fewshot: Path
    ingest: Path
    tiny_models: Path | None = None
    world: Path | None = None  # the synthesize output, for the reference embedders
    encoder: Path | None = None  # the encoder stage's output, for the encoder embedder kind


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: one embedder, a contiguous run of shot sets."""

    embedder: str
    index: int
    shot_set_ids: tuple[str, ...]

    @property
    def relpath(self) -> str:
        return f"{self.embedder}/shard-{self.index:05d}.parquet"


def needs_tiny_models(cfg: EmbedConfig) -> bool:
    return any(s.kind in MODEL_KINDS and s.model is None for s in cfg.embedders)


def needs_world(cfg: EmbedConfig) -> bool:
    return any(s.kind in WORLD_KINDS for s in cfg.embedders)


def needs_encoder(cfg: EmbedConfig) -> bool:
    return any(s.kind == "encoder" for s in cfg.embedders)


def active_embedders(cfg: EmbedConfig, inputs: EmbedInputs) -> list[EmbedderSpec]:
    """Embedders that can run on these inputs: the world references need the synthetic world."""
    return [s for s in cfg.embedders if s.kind not in WORLD_KINDS or inputs.world is not None]


@cache
def _load_embedder(
    spec: EmbedderSpec, tiny_models: Path | None, world: Path | None, encoder: Path | None, device: str
) -> Embedder:
    """One instance per (spec, inputs, device) and process: shard tasks in threads share it."""
    if spec.kind == "encoder":
        from ppd_core.embed.encoder import EncoderEmbedder

        if encoder is None:
            raise StageError(f"embedder {spec.name} (encoder) needs the encoder stage's output")
        return EncoderEmbedder(encoder, tiny_models, device, name=spec.name)
    if spec.kind == "vlm":
        from ppd_core.embed.vlm import VLMEmbedder

        return VLMEmbedder.from_spec(
            spec, (tiny_models / "vlm") if tiny_models else None, resolve_device(device)
        )
    if spec.kind == "clip_diff":
        from ppd_core.embed.clip import CLIPDiffEmbedder

        return CLIPDiffEmbedder.from_spec(
            spec, (tiny_models / "open_clip") if tiny_models else None, resolve_device(device)
        )
    if world is None:
        raise StageError(f"embedder {spec.name} ({spec.kind}) needs the synthetic world")
    return REFERENCE_EMBEDDERS[spec.kind].from_world_dir(world)


def load_embedder(spec: EmbedderSpec, inputs: EmbedInputs, device: str = "auto") -> Embedder:
    return _load_embedder(spec, inputs.tiny_models, inputs.world, inputs.encoder, device)


def read_shot_sets(fewshot_dir: Path) -> pa.Table:
    """All shot sets, sorted by (user_id, set_index): the order shards are cut in."""
    table = read_fewshot(fewshot_dir, "shot_sets")
    return table.sort_by([("user_id", "ascending"), ("set_index", "ascending")])


def plan_shards(cfg: EmbedConfig, inputs: EmbedInputs) -> list[ShardSpec]:
    ids = read_shot_sets(inputs.fewshot).column("shot_set_id").to_pylist()
    specs = []
    for spec in active_embedders(cfg, inputs):
        for index, start in enumerate(range(0, len(ids), cfg.shard_sets)):
            specs.append(ShardSpec(spec.name, index, tuple(ids[start : start + cfg.shard_sets])))
    return specs


def shard_schema(embedder: Embedder, name: str) -> pa.Schema:
    shape = tuple(embedder.output_shape)
    size = int(np.prod(shape))
    identity = embedder.identity()
    metadata = {
        "embedding_shape": json.dumps(list(shape)),
        "embedding_dtype": "float32",
        "embedder_name": name,
        "embedder_identity": json.dumps(identity, sort_keys=True),
    }
    return pa.schema(
        [
            ("user_id", pa.int64()),
            ("shot_set_id", pa.string()),
            ("split", pa.string()),
            ("set_index", pa.int32()),
            ("pair_ids", pa.list_(pa.string())),
            ("embedding", pa.list_(pa.float32(), size)),
            ("profile", pa.string()),
            ("embedder_model_id", pa.string()),
            ("embedder_digest", pa.string()),
        ],
        metadata=metadata,
    )


@cache
def _shot_set_rows(fewshot_dir: Path) -> dict[str, dict]:
    return {r["shot_set_id"]: r for r in read_shot_sets(fewshot_dir).to_pylist()}


def shot_sets_by_id(fewshot_dir: Path, ids: Sequence[str]) -> list[dict]:
    """shot_sets.parquet rows for ``ids``, in that order (the table is read once per directory)."""
    rows = _shot_set_rows(fewshot_dir)
    return [rows[i] for i in ids]


def to_shot_set(row: Mapping, ingest_dir: Path) -> ShotSet:
    store = ingest_images(ingest_dir)
    shots = tuple(
        Shot(
            caption=caption or "",
            preferred=store.get_pil(w).convert("RGB"),
            dispreferred=store.get_pil(lo).convert("RGB"),
            pair_id=pair_id,
            preferred_uid=w,
            dispreferred_uid=lo,
        )
        for pair_id, caption, w, lo in zip(
            row["pair_ids"], row["captions"], row["winner_uids"], row["loser_uids"], strict=True
        )
    )
    return ShotSet(row["shot_set_id"], int(row["user_id"]), shots, row["split"])


class ReuseIndex:
    """Embeddings computed earlier, by content hash, for one embedder identity.

    Scans the shards of complete `embed` outputs (other fingerprints of the same run root) whose
    schema metadata carries the same identity; keeps only (file, row) per shot set in memory."""

    def __init__(self, embed_root: Path, name: str, identity_json: str, exclude: Path | None = None):
        self.where: dict[str, tuple[Path, int]] = {}
        if not embed_root.is_dir():
            return
        for out in sorted(p for p in embed_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if exclude is not None and out.resolve() == exclude.resolve():
                continue
            if load_manifest(out) is None or not is_complete(out):
                continue
            for shard in sorted((out / name).glob("shard-*.parquet")):
                meta = pq.read_schema(shard).metadata or {}
                if meta.get(b"embedder_identity", b"").decode() != identity_json:
                    continue
                for row, sid in enumerate(
                    pq.read_table(shard, columns=["shot_set_id"]).column(0).to_pylist()
                ):
                    self.where.setdefault(sid, (shard, row))

    def take(self, ids: Sequence[str]) -> dict[str, dict]:
        by_file: dict[Path, list[tuple[str, int]]] = {}
        for sid in ids:
            if sid in self.where:
                path, row = self.where[sid]
                by_file.setdefault(path, []).append((sid, row))
        found = {}
        for path, items in by_file.items():
            try:
                table = pq.read_table(path, columns=["shot_set_id", "embedding", "profile"])
            except (OSError, pa.ArrowException):  # an earlier output removed since indexing: recompute
                continue
            picked = table.take(pa.array([r for _, r in items])).to_pylist()
            found.update({r["shot_set_id"]: r for r in picked})
        return found


def _shard_done(path: Path, spec: ShardSpec, schema: pa.Schema) -> bool:
    try:
        got = pq.read_schema(path)
        ids = pq.read_table(path, columns=["shot_set_id"]).column(0).to_pylist()
    except (OSError, pa.ArrowException):
        return False
    return got.metadata == schema.metadata and tuple(ids) == spec.shot_set_ids


@cache
def _reuse_index(embed_root: Path, name: str, identity_json: str, exclude: Path) -> ReuseIndex:
    return ReuseIndex(embed_root, name, identity_json, exclude=exclude)


def compute_shard(cfg: EmbedConfig, inputs: EmbedInputs, out_dir: Path, spec: ShardSpec) -> dict:
    """Write one shard atomically unless it is already complete; returns its counts."""
    embedder_spec = next(s for s in cfg.embedders if s.name == spec.embedder)
    embedder = load_embedder(embedder_spec, inputs, cfg.device)
    schema = shard_schema(embedder, spec.embedder)
    path = out_dir / spec.relpath
    if _shard_done(path, spec, schema):
        return {
            "embedder": spec.embedder,
            "shard": spec.index,
            "sets": len(spec.shot_set_ids),
            "computed": 0,
            "reused": 0,
            "resumed": 1,
        }
    rows = shot_sets_by_id(inputs.fewshot, spec.shot_set_ids)
    # embeddings of these shot sets computed by earlier outputs with the same embedder identity
    reuse = _reuse_index(
        out_dir.parent, spec.embedder, schema.metadata[b"embedder_identity"].decode(), out_dir
    )
    old = reuse.take(spec.shot_set_ids)
    todo = [r for r in rows if r["shot_set_id"] not in old]
    new: dict[str, tuple[np.ndarray, str | None]] = {}
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        result = embedder.embed([to_shot_set(r, inputs.ingest) for r in chunk])
        emb = result.embeddings.detach().to(torch.float32).cpu().numpy().reshape(len(chunk), -1)  # (B, D)
        for i, r in enumerate(chunk):
            new[r["shot_set_id"]] = (emb[i], result.profiles[i] if result.profiles else None)
    identity = embedder.identity()
    embeddings, profiles = [], []
    for r in rows:
        sid = r["shot_set_id"]
        if sid in old:
            embeddings.append(np.asarray(old[sid]["embedding"], dtype=np.float32))
            profiles.append(old[sid]["profile"])
        else:
            embeddings.append(new[sid][0])
            profiles.append(new[sid][1])
    size = int(np.prod(embedder.output_shape))
    flat = pa.array(np.concatenate(embeddings).astype(np.float32)) if rows else pa.array([], pa.float32())
    table = pa.table(
        {
            "user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
            "shot_set_id": pa.array([r["shot_set_id"] for r in rows], pa.string()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "set_index": pa.array([r["set_index"] for r in rows], pa.int32()),
            "pair_ids": pa.array([r["pair_ids"] for r in rows], pa.list_(pa.string())),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, size),
            "profile": pa.array(profiles, pa.string()),
            "embedder_model_id": pa.array([str(identity.get("model_id", ""))] * len(rows), pa.string()),
            "embedder_digest": pa.array([str(identity.get("weights_digest", ""))] * len(rows), pa.string()),
        },
        schema=schema,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return {
        "embedder": spec.embedder,
        "shard": spec.index,
        "sets": len(rows),
        "computed": len(todo),
        "reused": len(old),
        "resumed": 0,
    }


def embed_stage(
    cfg: EmbedConfig,
    inputs: EmbedInputs,
    out_dir: Path,
    map_fn: MapFn | None = None,
    progress: Progress | None = None,
) -> dict:
    """Stage body: plan shards, compute the missing ones, return counts.

    ``map_fn(fn, shards)`` may fan the shards out (Prefect maps them over its task runner); it must
    yield results in any order. Without it shards run one after another in this process."""
    specs = plan_shards(cfg, inputs)
    _reuse_index.cache_clear()  # earlier outputs may have changed since the last stage in this process
    total = sum(len(s.shot_set_ids) for s in specs)
    bar = tqdm(total=total, desc="embed", unit="set", disable=None, mininterval=1.0)

    results = []
    # shard work is a picklable function of plain arguments, so any executor (threads, Dask) can run it
    for r in (map_fn or map)(partial(compute_shard, cfg, inputs, out_dir), specs):
        results.append(r)
        bar.update(r["sets"])
        if progress:
            progress(sum(x["sets"] for x in results), total)
    bar.close()
    per_embedder: dict[str, dict] = {}
    for r in results:
        agg = per_embedder.setdefault(
            r["embedder"], {"sets": 0, "computed": 0, "reused": 0, "shards": 0, "shards_resumed": 0}
        )
        agg["sets"] += r["sets"]
        agg["computed"] += r["computed"]
        agg["reused"] += r["reused"]
        agg["shards"] += 1
        agg["shards_resumed"] += r["resumed"]
    for spec in active_embedders(cfg, inputs):
        embedder = load_embedder(spec, inputs, cfg.device)
        per_embedder.setdefault(
            spec.name, {"sets": 0, "computed": 0, "reused": 0, "shards": 0, "shards_resumed": 0}
        )
        per_embedder[spec.name].update(shape=list(embedder.output_shape), identity=embedder.identity())
    skipped = [s.name for s in cfg.embedders if s not in active_embedders(cfg, inputs)]
    return {
        "shot_sets": len(read_shot_sets(inputs.fewshot)),
        "embedders": per_embedder,
        "default": cfg.default,
        "skipped_embedders": skipped,
        "sets_computed": sum(a["computed"] for a in per_embedder.values()),
        "sets_reused": sum(a["reused"] for a in per_embedder.values()),
    }


def read_embeddings(embed_dir: Path, name: str) -> tuple[pa.Table, np.ndarray]:
    """One embedder's shards: the table (without the embedding column) and embeddings (N, *shape)."""
    shards = sorted((Path(embed_dir) / name).glob("shard-*.parquet"))
    if not shards:
        raise StageError(f"{embed_dir}: no embeddings for embedder {name!r}")
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    shape = json.loads(pq.read_schema(shards[0]).metadata[b"embedding_shape"])
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.drop(["embedding"]), flat.reshape(len(table), *shape).astype(np.float32)

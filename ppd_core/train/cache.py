"""The `cache_latents` stage: every image and caption training and evaluation will touch, encoded
once by the backbone, so training never re-encodes (the design).

Keyed by the backbone's identity and resolution (both are in the stage fingerprint through the
backbone config and the pretrain manifest). Layout::

    latents-00000.safetensors   tensor "x0" (N, C, H, W) float16/32, rows in index order
    text-00000.safetensors      tensor "text" (N, T, D)
    index.parquet               kind ("image"|"text"), key (image uid or caption), shard, row

Readers memory-map the shards (safetensors ``get_slice``), so a large cache never sits in RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ppd_core.data.fewshot import read_fewshot
from ppd_core.data.images import ingest_images
from ppd_core.errors import StageError
from ppd_core.models.backbone import Backbone

INDEX_SCHEMA = pa.schema(
    [("kind", pa.string()), ("key", pa.string()), ("shard", pa.string()), ("row", pa.int64())]
)
ROWS_PER_SHARD = 4096


def needed_keys(fewshot_dir: Path) -> tuple[list[str], list[str]]:
    """Image uids and captions of every training and evaluation pair (sorted, deduplicated)."""
    uids: set[str] = set()
    captions: set[str] = {""}  # the unconditional prompt, for guidance
    for name in ("train_pairs", "eval_pairs"):
        t = read_fewshot(fewshot_dir, name, columns=["caption", "winner_uid", "loser_uid"])
        uids.update(t.column("winner_uid").to_pylist())
        uids.update(t.column("loser_uid").to_pylist())
        captions.update(c or "" for c in t.column("caption").to_pylist())
    return sorted(uids), sorted(captions)


def _write_shards(
    out_dir: Path,
    prefix: str,
    tensor_name: str,
    keys: Sequence[str],
    encode: Callable[[Sequence[str]], torch.Tensor],
    batch: int,
    kind: str,
    advance: Callable[[int], None],
) -> list[dict]:
    index = []
    for shard_no, start in enumerate(range(0, len(keys), ROWS_PER_SHARD)):
        chunk = keys[start : start + ROWS_PER_SHARD]
        parts = []
        for b in range(0, len(chunk), batch):
            parts.append(encode(chunk[b : b + batch]).detach().cpu().contiguous())
            advance(len(chunk[b : b + batch]))
        name = f"{prefix}-{shard_no:05d}.safetensors"
        save_file({tensor_name: torch.cat(parts)}, str(out_dir / name))
        index += [{"kind": kind, "key": k, "shard": name, "row": i} for i, k in enumerate(chunk)]
    return index


@torch.inference_mode()
def cache_latents(
    backbone: Backbone,
    ingest_dir: Path,
    fewshot_dir: Path,
    out_dir: Path,
    batch: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Stage body: encode every needed image and caption; returns counts. ``progress(done, total)`` is
    called after every encoded batch (images, then captions), beside the tqdm bar."""
    uids, captions = needed_keys(fewshot_dir)
    store = ingest_images(ingest_dir)
    missing = [u for u in uids if u not in store]
    if missing:
        raise StageError(
            f"{len(missing)} image(s) of the training/eval pairs are not in {ingest_dir}/images, e.g. {missing[:3]}"
        )
    generator = torch.Generator().manual_seed(seed)  # SD samples the VAE posterior: fixed for the cache
    side = backbone.x0_shape[-1] if backbone.kind == "toy" else None

    def encode_images(keys: Sequence[str]) -> torch.Tensor:
        size = getattr(backbone, "resolution", None)
        arr = store.get_array(keys, size=size) if size else store.get_array(keys)  # (B, H, W, 3) uint8
        return backbone.encode_images(torch.from_numpy(np.ascontiguousarray(arr)), generator=generator)

    bar = tqdm(
        total=len(uids) + len(captions), desc="cache_latents", unit="item", disable=None, mininterval=1.0
    )
    total, done = len(uids) + len(captions), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        bar.update(n)
        if progress is not None:
            progress(done, total)

    index = _write_shards(out_dir, "latents", "x0", uids, encode_images, batch, "image", advance)
    index += _write_shards(out_dir, "text", "text", captions, backbone.encode_prompt, batch, "text", advance)
    bar.close()
    pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), out_dir / "index.parquet")
    return {
        "images": len(uids),
        "captions": len(captions),
        "x0_shape": list(backbone.x0_shape),
        "backbone": backbone.identity(),
        "pixel_side": side,
    }


class LatentCache:
    """Random access to cached x0 (by image uid) and text states (by caption)."""

    def __init__(self, directory: Path, device: str | torch.device = "cpu"):
        self.directory = Path(directory)
        self.device = torch.device(device)
        index = pq.read_table(self.directory / "index.parquet").to_pylist()
        self._where = {(r["kind"], r["key"]): (r["shard"], r["row"]) for r in index}
        self._files: dict[str, object] = {}

    def _tensor(self, shard: str, name: str):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.directory / shard), framework="pt")
        return self._files[shard].get_slice(name)

    def _gather(self, kind: str, name: str, keys: Sequence[str]) -> torch.Tensor:
        try:
            where = [self._where[(kind, k)] for k in keys]
        except KeyError as e:
            raise StageError(f"{self.directory}: no cached {kind} for {e.args[0][1]!r}") from None
        out = [self._tensor(shard, name)[row : row + 1] for shard, row in where]
        return torch.cat(out).to(self.device)

    def x0(self, uids: Sequence[str]) -> torch.Tensor:
        return self._gather("image", "x0", uids)

    def text(self, captions: Sequence[str]) -> torch.Tensor:
        return self._gather("text", "text", [c or "" for c in captions])

    def preload(self) -> LatentCache:
        """Read everything into memory (small caches: the toy world)."""
        for kind, name in (("image", "x0"), ("text", "text")):
            keys = [k for (kk, k) in self._where if kk == kind]
            if keys:
                data = self._gather(kind, name, keys)
                rows = {k: i for i, k in enumerate(keys)}
                setattr(self, f"_mem_{kind}", (data, rows))
        return self

    def get(self, kind: str, keys: Sequence[str]) -> torch.Tensor:
        mem = getattr(self, f"_mem_{kind}", None)
        if mem is None:
            return self.x0(keys) if kind == "image" else self.text(keys)
        data, rows = mem
        keys = [k or "" for k in keys] if kind == "text" else keys
        try:
            return data[torch.as_tensor([rows[k] for k in keys])]
        except KeyError as e:
            raise StageError(f"{self.directory}: no cached {kind} for {e.args[0]!r}") from None

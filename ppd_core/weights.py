"""Where model weights come from and what identifies them, written once for every model family (the
backbones, the VLM and open_clip embedders, judges and reward models).

- :func:`resolve_device`: ``auto`` -> a shard worker's own device, else the first CUDA device when there is
  one, else the CPU.
- :func:`local_snapshot`: a local model directory, or the hub cache's snapshot of a hub id; never downloads.
- :func:`weight_file_sha256` / :func:`files_digest`: content digests of weight files, the ``weights_digest``
  that identities (and so caches and exports) are keyed on.
- :func:`save_safetensors`: weights written so that the same tensors and metadata give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ppd_core.manifest import atomic_write_bytes, sha256_file

_HEX64 = re.compile(r"[0-9a-f]{64}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the device of this shard worker when it is pinned to one (:mod:`ppd_core.devices`), else
    cuda when available, else cpu; anything else as torch reads it (``"cuda:1"``, ``"cpu"``)."""
    if str(device) == "auto":
        from ppd_core.devices import pinned_device

        pinned = pinned_device()
        return torch.device(pinned or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device(device)


def local_snapshot(model: str | Path) -> Path | None:
    """The directory holding a model's files: ``model`` itself when it is a directory, else the hub cache's
    snapshot of the hub id ``model`` (its name is the revision); None when neither exists. Never downloads."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception:  # not cached, offline, or not a hub id
        return None


def weight_file_sha256(path: str | Path) -> str:
    """Content sha256 of a weight file; a hub-cache blob is already named by it (LFS files), so it is not
    read again."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name):
        return real.name
    return sha256_file(real)


def files_digest(paths: Sequence[str | Path]) -> str:
    """sha256 over the given weight files (sorted by name; each file's name, then its content)."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` (and string ``metadata``) to ``path`` as safetensors, atomically, the same bytes every
    time for the same tensors and metadata.

    safetensors serializes the metadata from a Rust hash map whose order changes from one process to the next,
    so two runs that computed identical weights wrote different files: different manifest digests, hence
    recomputed downstream stages, and exports that no checksum could compare. Here the header is written
    again with its metadata keys sorted (JSON, padded with spaces so the data stays 8-byte aligned, as
    safetensors writes it); the tensors' bytes and everything else are safetensors' own."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(path, len(text).to_bytes(8, "little") + text + blob[8 + size :])
    return Path(path)

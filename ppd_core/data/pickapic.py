"""Pick-a-Pic v2 Parquet sources: finding the files, opening them, checking their schema.

A source is a local directory (every ``*.parquet`` below it), a glob, a single file, or any fsspec
URL (``s3://``, ``gs://``, ``hf://``, ``memory://``, ``file://`` ...). :func:`resolve_source` turns
it into a sorted list of :class:`SourceFile`, each carrying its filesystem and a version token
(ETag, md5, blob id or mtime, whatever the filesystem reports) so :func:`source_identity` can
feed the ingest fingerprint: a changed file is a different input.

Schema rule (the Diffusion-DPO conventions): the 19 columns of ``PICKAPIC_V2``; ``jpg_0`` /
``jpg_1`` may be absent (the metadata-only twin), ``__index_level_0__`` may be absent (writers
without pandas drop it), extra columns are ignored. string/large_string/string_view,
binary/large_binary/binary_view and any timestamp unit or time zone count as the same type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ppd_core.errors import InputError, SchemaError
from ppd_core.schemas import IMAGE_COLUMNS, OPTIONAL_COLUMNS, PICKAPIC_V2, PICKAPIC_V2_METADATA

PARQUET_SUFFIX = ".parquet"
_GLOB_CHARS = "*?["
# info() keys that identify a file's content or version, most specific first (S3/GCS/Azure/HF/local).
_VERSION_KEYS = (
    "sha256",
    "blob_id",
    "ETag",
    "etag",
    "md5Hash",
    "md5",
    "crc32c",
    "mtime",
    "LastModified",
    "last_modified",
    "updated",
    "created",
)


@dataclass(frozen=True)
class SourceFile:
    """One Parquet file of a source.

    ``url`` is what messages, counts and the ``source_file`` column show: the plain path for local
    files, the full URL otherwise. ``path`` is the filesystem's own path, used to open the file.
    """

    url: str
    path: str
    size: int
    version: str | None
    fs: Any = field(compare=False, repr=False, hash=False)  # fsspec AbstractFileSystem

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)


def _version_token(info: dict) -> str | None:
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):  # hf:// LFS files carry their content hash
        return f"sha256:{lfs['sha256']}"
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}:{value}"
    return None


def _hidden(rel_parts: Iterable[str]) -> bool:
    """Hive/Spark convention: names starting with '.' or '_' (``.cache``, ``_SUCCESS``) are not data."""
    return any(part.startswith((".", "_")) for part in rel_parts)


def resolve_source(source: str) -> list[SourceFile]:
    """The Parquet files of ``source``, sorted by URL. Raises InputError naming the source if there are none."""
    try:
        fs, root = fsspec.core.url_to_fs(str(source))
    except (ImportError, ValueError) as e:  # unknown protocol, missing optional backend
        raise InputError(f"{source}: cannot open this source ({e})") from e
    try:
        if any(ch in root for ch in _GLOB_CHARS):
            infos = fs.glob(root, detail=True)
            infos = {p: i for p, i in infos.items() if i.get("type") == "file"}
        elif fs.isdir(root):
            found = fs.find(root, withdirs=False, detail=True)
            base = root.rstrip("/")
            infos = {
                p: i
                for p, i in found.items()
                if p.lower().endswith(PARQUET_SUFFIX) and not _hidden(p[len(base) :].strip("/").split("/"))
            }
        elif fs.isfile(root):
            infos = {root: fs.info(root)}
        else:
            raise InputError(f"{source}: no such file or directory")
    except InputError:
        raise
    except (OSError, ValueError, PermissionError) as e:  # credentials, network, listing errors
        raise InputError(f"{source}: cannot list this source ({type(e).__name__}: {e})") from e
    if not infos:
        raise InputError(f"{source}: no Parquet files found")
    local = isinstance(fs, LocalFileSystem)
    files = [
        SourceFile(
            url=path if local else fs.unstrip_protocol(path),
            path=path,
            size=int(info.get("size") or 0),
            version=_version_token(info),
            fs=fs,
        )
        for path, info in infos.items()
    ]
    return sorted(files, key=lambda f: f.url)


def source_identity(files: Iterable[SourceFile]) -> dict:
    """JSON-able identity of a source listing, for the ingest fingerprint."""
    return {"files": [[f.url, f.size, f.version] for f in files]}


def open_parquet(file: SourceFile) -> pq.ParquetFile:
    """Open ``file`` for streaming; a truncated or non-Parquet file raises InputError naming it."""
    try:
        if file.is_local:  # Arrow's native reader: fsspec's local wrapper reads through Python
            return pq.ParquetFile(file.path)
        return pq.ParquetFile(file.path, filesystem=file.fs, pre_buffer=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{file.url}: not a readable Parquet file ({e})") from e


def _canonical(t: pa.DataType) -> str:
    """Type family used for comparison: the string, binary and timestamp variants are one family each."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return str(t)


def _column_problem(schema: pa.Schema, name: str) -> str | None:
    expected = PICKAPIC_V2.field(name).type
    idx = schema.get_field_index(name)
    if idx < 0:
        return f"missing column {name!r} (expected {expected})"
    found = schema.field(idx).type
    if _canonical(found) != _canonical(expected):
        return f"column {name!r} has type {found}, expected {expected}"
    return None


def check_schema(schema: pa.Schema, path: str, images: Literal["auto", "required", "none"]) -> bool:
    """Check ``schema`` against Pick-a-Pic v2; return whether the image columns will be read.

    ``images``: ``auto`` reads jpg_0/jpg_1 when both are present, ``required`` demands them, ``none``
    ignores them. Every problem is listed in one SchemaError naming ``path`` and the columns.
    """
    problems = []
    for name in PICKAPIC_V2_METADATA.names:
        if name in OPTIONAL_COLUMNS and schema.get_field_index(name) < 0:
            continue  # optional and absent; when present it must still have its type
        if p := _column_problem(schema, name):
            problems.append(p)
    present = [c for c in IMAGE_COLUMNS if schema.get_field_index(c) >= 0]
    # auto with only one of the two image columns is a damaged file, not the metadata-only twin
    read_images = images == "required" or (images == "auto" and bool(present))
    if read_images:
        problems += [p for c in IMAGE_COLUMNS if (p := _column_problem(schema, c))]
    if problems:
        hint = (
            " (set ingest.images=none to ingest metadata only)"
            if images == "required" and not present
            else ""
        )
        raise SchemaError(f"{path}: not a Pick-a-Pic v2 table: " + "; ".join(problems) + hint)
    return read_images

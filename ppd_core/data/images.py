"""Image bytes: validity checks, webdataset shards keyed by image uid, and random access by uid.

Layout of an ``images/`` directory (written by :class:`ImageShardWriter`, read by :class:`ImageStore`)::

    images-000000.tar   webdataset shard: per image ``<key>.<ext>`` (the original bytes) + ``<key>.json``
    images-000001.tar   ({"uid", "format", "size": [w, h]}); ``<key>`` is the uid when it is a safe
    ...                 sample key ([A-Za-z0-9_-]), else the blake2b hex of the uid
    sizes.json          {shard file name: sample count}, as open_clip reads it
    index.parquet       schema IMAGE_INDEX: uid -> shard, byte offset and length of the image data

Shards are POSIX ustar archives whose headers are built here rather than by ``webdataset.TarWriter``:
Python's ``tarfile`` header code costs ~30 us per member (measured: 65 us per 2-member sample), which
alone would take ingestion below half the throughput of a bare scan. The headers are byte-identical
to ``tarfile``'s for the same fields (a test checks it) and the members are what ``TarWriter``
writes (mode 0444, owner "bigdata"), except for a fixed mtime so identical input gives identical
shards. Data offsets are known as they are written (tests check them against ``tarfile``'s
``offset_data`` and read the shards with ``webdataset.WebDataset``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ppd_core.config import IngestConfig
from ppd_core.data.union import IMAGES_DIR, image_roots
from ppd_core.errors import StageError
from ppd_core.schemas import IMAGE_INDEX

IMAGE_REASONS = (
    "empty_image",
    "undecodable_image",
    "unsupported_format",
    "decompression_bomb",
    "image_too_large",
)
SHARD_PATTERN = "images-{:06d}.tar"
SIZES_NAME = "sizes.json"
INDEX_NAME = "index.parquet"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_FORMAT_ALIASES = {"MPO": "JPEG"}  # a JPEG with a multi-picture segment is still a JPEG
_TAIL = 64  # bytes searched for the end marker: tolerates a little trailing padding
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,90}")
_MTIME = 0  # fixed member mtime: identical input -> identical shards


class ImageCheck(NamedTuple):
    """Outcome of :func:`check_image`. ``reason`` is one of IMAGE_REASONS when not ok, else ''.

    A NamedTuple, not a frozen dataclass: one is built per image and this is ~5x cheaper to build.
    """

    ok: bool
    reason: str = ""
    detail: str = ""
    format: str | None = None
    width: int = 0
    height: int = 0


def _fail(reason: str, detail: str, fmt: str | None = None, w: int = 0, h: int = 0) -> ImageCheck:
    return ImageCheck(False, reason, detail, fmt, w, h)


@contextlib.contextmanager
def bomb_guard() -> Iterator[None]:
    """Turn PIL's DecompressionBombWarning into an exception inside the block.

    Entered once per batch by ingestion rather than per image (entering costs a few microseconds).
    Like every ``warnings.catch_warnings`` it changes process-global state: use from one thread.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def accepted_formats(cfg: IngestConfig) -> tuple[str, ...]:
    """cfg.formats restricted to what this Pillow build can open (Image.open rejects unknown names)."""
    Image.init()
    return tuple(f.upper() for f in cfg.formats if f.upper() in Image.OPEN)


def _truncated(data: bytes, fmt: str) -> str | None:
    """Why the end of ``data`` shows a cut-off file, or None. Checks the format's end marker only."""
    tail = data[-_TAIL:]
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "no JPEG end-of-image marker (FFD9): truncated"
    if fmt == "PNG" and b"IEND" not in tail:
        return "no PNG IEND chunk: truncated"
    if fmt == "WEBP" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        return "shorter than its RIFF size: truncated"
    if fmt == "GIF" and not data.rstrip(b"\0").endswith(b";"):
        return "no GIF trailer: truncated"
    return None


def check_image_unguarded(data: bytes | None, cfg: IngestConfig, formats: tuple[str, ...]) -> ImageCheck:
    """:func:`check_image` without the warning guard; call inside :func:`bomb_guard`.

    ``formats`` is ``accepted_formats(cfg)``, computed once by the caller.
    """
    if not data:
        return _fail("empty_image", "no bytes" if data is None else "0 bytes")
    if len(data) > cfg.max_image_bytes:
        return _fail("image_too_large", f"{len(data)} bytes > max_image_bytes {cfg.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            fmt = _FORMAT_ALIASES.get(im.format, im.format)
            w, h = im.size
            if fmt not in formats:
                return _fail("unsupported_format", f"{fmt} not in {list(cfg.formats)}", fmt, w, h)
            if w * h > cfg.max_image_pixels:
                return _fail(
                    "decompression_bomb",
                    f"{w}x{h} = {w * h} pixels > max_image_pixels {cfg.max_image_pixels}",
                    fmt,
                    w,
                    h,
                )
            if why := _truncated(data, fmt):
                return _fail("undecodable_image", why, fmt, w, h)
            if cfg.image_check == "full":
                im.load()  # decodes every pixel: catches corrupt entropy-coded data
            return ImageCheck(True, "", "", fmt, w, h)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _fail("decompression_bomb", str(e))
    except UnidentifiedImageError:
        return _classify_unknown(data, cfg)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure on untrusted bytes means "undecodable"
        return _fail("undecodable_image", f"{type(e).__name__}: {e}")


def _classify_unknown(data: bytes, cfg: IngestConfig) -> ImageCheck:
    """Bytes none of the accepted formats opens: a known but unaccepted format, or garbage."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _fail("unsupported_format", f"{im.format} not in {list(cfg.formats)}", im.format, *im.size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _fail("decompression_bomb", str(e))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001
        return _fail("undecodable_image", f"not an image PIL can identify (starts {data[:8].hex()})")


def check_image(data: bytes | None, cfg: IngestConfig) -> ImageCheck:
    """Check image bytes against ``cfg``: readable, accepted format, not a bomb, not truncated.

    ``cfg.image_check == "header"`` parses the header only (PIL opens lazily) and checks the
    format's end marker (JPEG FFD9, PNG IEND, WEBP RIFF size, GIF trailer) so cut-off files are
    caught without decoding pixels; ``"full"`` also decodes every pixel. Never raises on bad bytes.
    """
    with bomb_guard():
        return check_image_unguarded(data, cfg, accepted_formats(cfg))


def _sample_key(uid: str) -> str:
    """webdataset splits keys at the first '.' and treats '/' as a directory: hash uids that contain them."""
    return uid if _SAFE_KEY.fullmatch(uid) else hashlib.blake2b(uid.encode(), digest_size=16).hexdigest()


def uid_digest(uid: str) -> int:
    """Dedupe key of an image uid."""
    return digest64(uid.encode())


def digest64(data: bytes) -> int:
    """First 64 bits of sha256 as an int: the dedupe key (sha256 runs ~2x blake2b where the CPU has SHA
    instructions, which matters when whole rows with their image bytes are hashed)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


class DigestSet:
    """A set of 64-bit digests at ~8 bytes per entry: a sorted numpy array plus a small Python set
    of recent additions, merged in when it reaches ``merge_at``. Dedupe across millions of rows or
    images therefore costs tens of MB, not hundreds (a Python set of ints takes ~70 B per entry).
    Two distinct keys share a digest with probability ~n^2 / 2^65 (about 1e-7 for two million keys).
    The ``*_many`` methods work on a whole batch at once (one vectorised search of the array).
    """

    def __init__(self, merge_at: int = 8192):
        self._old = np.empty(0, np.uint64)  # sorted
        self._new: set[int] = set()
        self._merge_at = merge_at

    def __len__(self) -> int:
        return len(self._old) + len(self._new)

    def __contains__(self, digest: int) -> bool:
        if digest in self._new:
            return True
        old = self._old
        if not len(old):
            return False
        i = int(old.searchsorted(np.uint64(digest)))
        return i < len(old) and int(old[i]) == digest

    def add(self, digest: int) -> None:
        self._new.add(digest)
        self._maybe_merge()

    def contains_many(self, digests: Sequence[int]) -> np.ndarray:
        """Membership of each digest, bool ``(N,)``."""
        d = np.asarray(digests, np.uint64)
        old = self._old
        if len(old):
            i = np.minimum(old.searchsorted(d), len(old) - 1)
            hit = old[i] == d
        else:
            hit = np.zeros(len(d), bool)
        if self._new:
            new = self._new
            hit |= np.fromiter((x in new for x in d.tolist()), bool, len(d))
        return hit

    def add_many(self, digests: Sequence[int]) -> np.ndarray:
        """Add every digest in order; True where it was not present before (a repeat within
        ``digests`` is False after its first occurrence)."""
        d = np.asarray(digests, np.uint64)
        fresh = ~self.contains_many(d)
        first = np.zeros(len(d), bool)
        first[np.unique(d, return_index=True)[1]] = True  # first occurrence of each value
        fresh &= first
        self._new.update(d[fresh].tolist())
        self._maybe_merge()
        return fresh

    def _maybe_merge(self) -> None:
        if len(self._new) >= self._merge_at:
            new = np.unique(np.fromiter(self._new, np.uint64, len(self._new)))
            # sorted insert: one O(n) move instead of re-sorting everything (np.union1d)
            self._old = np.insert(self._old, self._old.searchsorted(new), new)
            self._new.clear()


def _header_template() -> bytes:
    hdr = bytearray(512)
    hdr[100:108] = b"0000444\0"  # mode r--r--r--, as TarWriter
    hdr[108:116] = b"0000000\0"  # uid
    hdr[116:124] = b"0000000\0"  # gid
    hdr[136:148] = b"%011o\0" % _MTIME
    hdr[148:156] = b" " * 8  # checksum placeholder
    hdr[156:157] = b"0"  # regular file
    hdr[257:265] = b"ustar\x0000"
    hdr[265:272] = b"bigdata"  # uname
    hdr[297:304] = b"bigdata"  # gname
    return bytes(hdr)


_HEADER_TEMPLATE = _header_template()
_TEMPLATE_SUM = sum(_HEADER_TEMPLATE)
_HDR_MODE_IDS, _HDR_MTIME, _HDR_TAIL = (
    _HEADER_TEMPLATE[100:124],
    _HEADER_TEMPLATE[136:148],
    _HEADER_TEMPLATE[156:],
)
_RECORD = 10240  # tar record size: archives are padded to a multiple, as tarfile does
_ZEROS = bytes(512)
_WRITE_BUFFER = 1 << 20


def _ustar_header(name: str, size: int) -> bytes:
    """One 512-byte POSIX ustar header for a regular file (what tarfile/TarWriter write, minus their cost)."""
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, _MTIME, 0o444, "bigdata", "bigdata"
        return ti.tobuf(tarfile.PAX_FORMAT)  # long names / huge members: pax extended header
    size_field = b"%011o\0" % size
    # checksum: byte sum of the header with the checksum field as 8 spaces (the template's sum has them)
    checksum = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return b"".join(
        (raw, _ZEROS[: 100 - len(raw)], _HDR_MODE_IDS, size_field, _HDR_MTIME, checksum, _HDR_TAIL)
    )


class ImageShardWriter:
    """Writes each image uid once into webdataset shards, then ``sizes.json`` and ``index.parquet``.

    Shards are written as ``*.tar.tmp`` and renamed when full; the index and sizes are written on
    :meth:`close`. Memory: ~8 bytes per image written (:class:`DigestSet`) plus the index rows of one shard.
    """

    def __init__(self, directory: str | Path, max_images: int):
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_images = max_images
        self.sizes: dict[str, int] = {}
        self.images_written = 0
        self._seen = DigestSet()
        self._shard: io.BufferedWriter | None = None
        self._shard_name = ""
        self._pos = 0
        self._rows: list[tuple] = []  # index rows of the open shard
        self._index = pq.ParquetWriter(self.directory / f"{INDEX_NAME}.tmp", IMAGE_INDEX, compression="zstd")
        self._closed = False

    def __contains__(self, uid: str) -> bool:
        return uid_digest(uid) in self._seen

    def __enter__(self) -> ImageShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def known(self, digests: Sequence[int]) -> np.ndarray:
        """Whether each image (by :func:`uid_digest`) was written, bool ``(N,)``: one vectorised lookup."""
        return self._seen.contains_many(digests)

    def add(self, uid: str, data: bytes, check: ImageCheck, *, digest: int | None = None) -> bool:
        """Write ``data`` under ``uid`` unless that uid was written before; True when written.

        ``digest`` is ``uid_digest(uid)`` when the caller already has it.
        """
        digest = uid_digest(uid) if digest is None else digest
        if digest in self._seen:
            return False
        if not check.ok:
            raise ValueError(f"image {uid!r} failed its check ({check.reason}); it must not be written")
        if self._shard is None:
            self._open_shard()
        fmt, w, h = check.format, check.width, check.height
        ext = EXTENSIONS.get(fmt or "", (fmt or "bin").lower())
        if _SAFE_KEY.fullmatch(uid) and fmt and fmt.isalnum():
            key = uid  # nothing to escape: format the JSON directly (json.dumps costs more than the write)
            meta = b'{"uid": "%s", "format": "%s", "size": [%d, %d]}' % (uid.encode(), fmt.encode(), w, h)
        else:
            key = _sample_key(uid)
            meta = json.dumps({"uid": uid, "format": fmt, "size": [w, h]}).encode()
        # one sample = image member + JSON member, each a 512-byte header and data padded to 512
        header = _ustar_header(f"{key}.{ext}", len(data))
        offset = self._pos + len(header)
        parts = (
            header,
            data,
            _ZEROS[: -len(data) % 512],
            _ustar_header(f"{key}.json", len(meta)),
            meta,
            _ZEROS[: -len(meta) % 512],
        )
        self._shard.write(b"".join(parts))  # one call: copying small images beats six buffered writes
        self._pos += sum(map(len, parts))
        self._seen.add(digest)
        self._rows.append((uid, self._shard_name, offset, len(data), fmt, w, h))
        self.sizes[self._shard_name] += 1
        self.images_written += 1
        if self.sizes[self._shard_name] >= self.max_images:
            self._close_shard()
        return True

    def _open_shard(self) -> None:
        self._shard_name = SHARD_PATTERN.format(len(self.sizes))
        self._shard = open(self.directory / f"{self._shard_name}.tmp", "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115
        self._pos = 0
        self.sizes[self._shard_name] = 0

    def _close_shard(self) -> None:
        end = self._pos + 1024  # two zero blocks end the archive
        self._shard.write(b"\0" * (1024 + (-end % _RECORD)))
        self._shard.close()
        self._shard = None
        tmp = self.directory / f"{self._shard_name}.tmp"
        os.replace(tmp, self.directory / self._shard_name)
        columns = zip(*self._rows, strict=True)
        self._index.write_table(
            pa.table(dict(zip(IMAGE_INDEX.names, columns, strict=True)), schema=IMAGE_INDEX)
        )
        self._rows = []

    def close(self) -> dict:
        """Finish the open shard, write ``index.parquet`` and ``sizes.json``; returns counts."""
        if not self._closed:
            if self._shard is not None:
                self._close_shard()
            self._index.close()
            os.replace(self.directory / f"{INDEX_NAME}.tmp", self.directory / INDEX_NAME)
            # tmp + rename without fsync: durability is the stage commit's job (ppd_core.manifest), and an
            # fsync here would flush every shard written so far (ext4 orders data before metadata)
            tmp = self.directory / f"{SIZES_NAME}.tmp"
            tmp.write_text(json.dumps(self.sizes, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.directory / SIZES_NAME)
            self._closed = True
        return {"images": self.images_written, "shards": len(self.sizes)}

    def abort(self) -> None:
        """Release file handles after an error; leaves no complete-looking index or sizes file."""
        if self._shard is not None:
            with contextlib.suppress(OSError):
                self._shard.close()
            self._shard = None
        if not self._closed:
            self._index.close()
            self._closed = True


class ImageStore:
    """Random access to an ``images/`` directory by image uid (local path or fsspec URL), or to several
    of them as one store (:meth:`union`: the days of a partitioned ingest).

    The index is loaded once; every read is one ranged read of the shard (no tar scan), so the
    store is safe to share between threads.
    """

    def __init__(self, directory: str | Path):
        self.fs, self.root = fsspec.core.url_to_fs(str(directory))
        index_path = f"{self.root.rstrip('/')}/{INDEX_NAME}"
        if not self.fs.exists(index_path):
            raise FileNotFoundError(f"{directory}: no {INDEX_NAME}; not an image shard directory")
        self.index = pq.read_table(index_path, filesystem=self.fs, schema=IMAGE_INDEX)
        self._uids: list[str] = self.index.column("image_uid").to_pylist()
        self._row = {uid: i for i, uid in enumerate(self._uids)}
        names = self.index.column("shard").to_pylist()
        unique = sorted(set(names))
        self._paths = [f"{self.root.rstrip('/')}/{n}" for n in unique]
        where = {n: i for i, n in enumerate(unique)}
        self._shard = np.fromiter((where[n] for n in names), dtype=np.int32, count=len(names))
        self._offset = self.index.column("offset").to_numpy()
        self._nbytes = self.index.column("nbytes").to_numpy()

    @classmethod
    def union(cls, directories: Sequence[str | Path]) -> ImageStore:
        """One store over several ``images/`` directories; a uid in several of them is read from the
        first (the same uid names the same image bytes). One directory gives the plain store."""
        stores = [cls(d) for d in directories]
        if len(stores) == 1:
            return stores[0]
        if not stores:
            raise ValueError("an image store union needs at least one directory")
        first = stores[0]
        union = cls.__new__(cls)
        union.fs, union.root = first.fs, first.root
        union._paths, uids, shard, offset, nbytes, tables = [], [], [], [], [], []
        seen: set[str] = set()
        for store in stores:
            keep = [i for i, uid in enumerate(store._uids) if uid not in seen]
            seen.update(store._uids[i] for i in keep)
            take = np.asarray(keep, dtype=np.int64)
            uids += [store._uids[i] for i in keep]
            shard.append(store._shard[take] + len(union._paths))
            offset.append(store._offset[take])
            nbytes.append(store._nbytes[take])
            tables.append(store.index.take(pa.array(take)))
            union._paths += store._paths
        union.index = pa.concat_tables(tables)
        union._uids, union._row = uids, {uid: i for i, uid in enumerate(uids)}
        union._shard, union._offset, union._nbytes = (np.concatenate(a) for a in (shard, offset, nbytes))
        return union

    @property
    def uids(self) -> list[str]:
        return list(self._uids)

    @property
    def shard_urls(self) -> list[str]:
        """Shard paths in order, for ``webdataset.WebDataset(urls, shardshuffle=False)``."""
        return [self.fs.unstrip_protocol(p) for p in self._paths]

    def __len__(self) -> int:
        return len(self._uids)

    def __contains__(self, uid: object) -> bool:
        return uid in self._row

    def _lookup(self, uid: str) -> int:
        try:
            return self._row[uid]
        except KeyError:
            raise KeyError(f"image uid {uid!r} is not in {self.root}") from None

    def get_bytes(self, uid: str) -> bytes:
        """The original image bytes, byte-identical to the ingested ones."""
        i = self._lookup(uid)
        start = int(self._offset[i])
        return self.fs.cat_file(self._paths[self._shard[i]], start=start, end=start + int(self._nbytes[i]))

    def get_pil(self, uid: str) -> Image.Image:
        """The decoded image (mode as stored)."""
        im = Image.open(io.BytesIO(self.get_bytes(uid)))
        im.load()
        return im

    def get_array(self, uids: Sequence[str], size: int | tuple[int, int] | None = None) -> np.ndarray:
        """RGB pixels, uint8 ``(N, H, W, 3)``. Without ``size`` all images must share one size;
        with it (``S`` or ``(W, H)``) each is resized with bicubic filtering."""
        target = (size, size) if isinstance(size, int) else size
        arrays = []
        for uid in uids:
            im = self.get_pil(uid).convert("RGB")
            if target is not None and im.size != tuple(target):
                im = im.resize(tuple(target), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.uint8))  # (H, W, 3)
        if not arrays:
            h, w = (target[1], target[0]) if target else (0, 0)
            return np.zeros((0, h, w, 3), np.uint8)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)}; pass size= to resize them")
        return np.stack(arrays)  # (N, H, W, 3)


INGEST_IMAGES = IMAGES_DIR  # the image store inside an ingest output


def has_ingest_images(ingest_dir: str | Path) -> bool:
    """Whether an ingest output holds images (a metadata-only source gives none)."""
    return any((d / INDEX_NAME).is_file() for d in image_roots(ingest_dir))


def ingest_images(ingest_dir: str | Path) -> ImageStore:
    """The ingest stage's image store (``<ingest>/images``; for a partitioned run, one store over every
    day's), opened once per directory and process; a clear error when ingestion wrote no images."""
    return _open_ingest_images(str(ingest_dir))


@functools.cache
def _open_ingest_images(ingest_dir: str) -> ImageStore:
    if not has_ingest_images(ingest_dir):
        raise StageError(
            f"{ingest_dir}: ingestion wrote no images (metadata-only source?); this stage needs image bytes"
        )
    return ImageStore.union([d for d in image_roots(ingest_dir) if (d / INDEX_NAME).is_file()])

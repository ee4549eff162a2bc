"""Atomic stage outputs and their manifests.

A stage writes into a partial directory; :func:`commit` hashes every file, writes
``manifest.json`` last, and renames the directory into ``<root>/<stage>/<fingerprint>/``. A killed
run therefore leaves either a complete directory or a hidden ``.partial`` one that no reader takes
for complete. :func:`is_complete` is the one test of completeness used everywhere (with or without
Prefect): the manifest parses and every listed file exists with its recorded size and content.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ppd_core import __version__, locks
from ppd_core.config import digest_json
from ppd_core.layout import RunLayout

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int
    sha256: str
    mtime_ns: int


class Manifest(BaseModel):
    """What a committed stage directory holds. ``digest`` identifies its content for downstream keys."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    fingerprint: str
    digest: str
    code_version: str
    created_at: str
    config: dict[str, Any]
    upstream: dict[str, str]
    files: dict[str, FileEntry]
    counts: dict[str, Any]
    partition: str | None = None  # set for a per-partition output (e.g. created_date=2023-05-01)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def truncate_jsonl(path: str | Path, step: int) -> int:
    """Drop the lines of a JSONL log (one ``{"step": ...}`` object a line) logged after ``step``, and a line a
    kill cut short, so that a run resumed from its step-``step`` checkpoint logs each step once. Returns how
    many lines were dropped (the file is rewritten atomically only then)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if logged <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
    return len(lines) - len(kept)


def resume_tensorboard(directory: str | Path, step: int):
    """A TensorBoard ``SummaryWriter`` on ``directory`` for a run that (re)starts after ``step``, keeping the
    run's history in one event file with every (tags, step) once, as an uninterrupted run leaves it.

    From scratch (``step`` 0) the event files of earlier attempts are removed. Resumed from the checkpoint
    at ``step``, the summaries those files hold through ``step`` (a run flushes its writer before each
    checkpoint) are copied, in order and once each, into the new writer's file, which is flushed; then the
    earlier files are removed. What they hold past ``step`` is dropped: the resumed run logs it again. A kill
    between the copy and the removal leaves the history twice, which the next resume merges into one again.
    The counterpart of :func:`truncate_jsonl` for TensorBoard (whose writer cannot append to a file)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(directory)
    earlier = sorted(directory.glob("events.out.tfevents.*"))  # the names start with the creation time
    kept = {}
    for path in earlier if step > 0 else []:
        for event in EventFileLoader(str(path)).Load():  # stops at a record cut short by a kill
            if event.HasField("summary") and event.step <= step:
                kept.setdefault((event.step, tuple(v.tag for v in event.summary.value)), event)
    writer = SummaryWriter(str(directory))
    for event in kept.values():
        writer.file_writer.add_event(event, walltime=event.wall_time)
    writer.flush()
    for path in earlier:
        path.unlink(missing_ok=True)
    return writer


def load_manifest(directory: str | Path) -> Manifest | None:
    """The directory's manifest, or None if it is absent or unreadable."""
    path = Path(directory) / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def verify(directory: str | Path) -> list[str]:
    """Problems that make ``directory`` incomplete; empty when it is complete.

    Size is checked for every file; content is re-hashed only when the modification time differs
    from the recorded one, so an untouched directory is checked without reading its files while an
    edited one is caught even when its size did not change.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest is None:
        return [f"{directory}: no readable {MANIFEST_NAME}"]
    problems = []
    for rel, entry in manifest.files.items():
        path = directory / rel
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if st.st_size != entry.size:
            problems.append(f"{rel}: size {st.st_size} != {entry.size}")
        elif st.st_mtime_ns != entry.mtime_ns and sha256_file(path) != entry.sha256:
            problems.append(f"{rel}: content changed")
    return problems


def is_complete(directory: str | Path) -> bool:
    return not verify(directory)


def _list_files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def prepare_partial(partial: Path, resume: bool = False) -> Path:
    """Create the partial directory; without ``resume`` anything left by an earlier attempt is cleared."""
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def commit(
    partial: Path,
    final: Path,
    *,
    stage: str,
    fingerprint: str,
    code_version: str,
    config: Mapping[str, Any],
    upstream: Mapping[str, str],
    counts: Mapping[str, Any],
    partition: str | None = None,
) -> Manifest:
    """Hash the partial directory's files, write the manifest last, rename into place. The hidden temporary
    files of atomic writes (``.<name>.<hex>.tmp``) that a writer killed mid-write left behind (a shard worker
    that died, its shard since recomputed by another) are removed first: never part of an output."""
    for leftover in partial.rglob(".*.tmp"):
        if leftover.is_file():
            leftover.unlink()
    files = {}
    for rel in _list_files(partial):
        st = (partial / rel).stat()
        files[rel] = FileEntry(size=st.st_size, sha256=sha256_file(partial / rel), mtime_ns=st.st_mtime_ns)
    digest = digest_json(
        {"stage": stage, "fingerprint": fingerprint, "files": {k: v.sha256 for k, v in files.items()}}
    )
    manifest = Manifest(
        stage=stage,
        fingerprint=fingerprint,
        digest=digest,
        code_version=code_version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        config=dict(config),
        upstream=dict(upstream),
        files=files,
        counts=dict(counts),
        partition=partition,
    )
    # unpartitioned manifests keep their earlier bytes (no "partition": null)
    blob = manifest.model_dump_json(indent=2, exclude={"partition"} if partition is None else None)
    atomic_write_bytes(partial / MANIFEST_NAME, blob.encode())
    if final.exists():
        # an incomplete or tampered earlier output: move it aside first (directories cannot be replaced atomically)
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        os.rename(final, stale)
        os.rename(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(partial, final)
    return manifest


@dataclass(frozen=True)
class StageOutcome:
    """A stage's manifest plus whether it was reused from a complete earlier output."""

    manifest: Manifest
    directory: Path
    reused: bool


class StageBuild:
    """One stage output being reused or built (:func:`building`): ``outcome`` is set when it was complete;
    otherwise write into ``partial`` and :meth:`commit` the counts."""

    def __init__(self, final: Path, partial: Path | None, outcome: StageOutcome | None, commit_fn=None):
        self.final, self.partial, self.outcome, self._commit = final, partial, outcome, commit_fn

    def commit(self, counts: Mapping[str, Any]) -> StageOutcome:
        self.outcome = StageOutcome(self._commit(counts), self.final, reused=False)
        return self.outcome


@contextlib.contextmanager
def building(
    layout: RunLayout,
    stage: str,
    fingerprint: str,
    *,
    code_version: str,
    config: Mapping[str, Any],
    upstream: Mapping[str, str],
    resume: bool = False,
    partition: str | None = None,
    force: bool = False,
    on_wait: Callable[[str], None] | None = None,
):
    """The reuse-or-build protocol of :func:`run_stage` as a block, so that several outputs can be held and
    built together (one lock each, taken in the caller's order)::

        with building(layout, stage, fp, ...) as b:
            if b.outcome is None:
                b.commit(build(b.partial))
    """
    final = layout.stage_dir(stage, fingerprint, partition)
    if not force and is_complete(final):
        yield StageBuild(final, None, StageOutcome(load_manifest(final), final, reused=True))
        return
    what = f"{stage} {fingerprint}" + (f" ({partition})" if partition else "")
    with locks.hold(layout.lock_path(stage, fingerprint, partition), on_wait=on_wait, what=what):
        if not force and is_complete(final):  # built by whoever held the lock before us
            yield StageBuild(final, None, StageOutcome(load_manifest(final), final, reused=True))
            return
        partial = prepare_partial(
            layout.partial_dir(stage, fingerprint, partition), resume=resume and not force
        )
        yield StageBuild(
            final,
            partial,
            None,
            lambda counts: commit(
                partial,
                final,
                stage=stage,
                fingerprint=fingerprint,
                code_version=f"{__version__}/{stage}.v{code_version}",
                config=config,
                upstream=upstream,
                counts=counts,
                partition=partition,
            ),
        )


def run_stage(
    layout: RunLayout,
    stage: str,
    fingerprint: str,
    build: Callable[[Path], Mapping[str, Any]],
    *,
    code_version: str,
    config: Mapping[str, Any],
    upstream: Mapping[str, str],
    resume: bool = False,
    partition: str | None = None,
    force: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> StageOutcome:
    """Reuse ``<root>/<stage>/<fingerprint>/`` when complete; otherwise ``build(partial_dir) -> counts`` and commit.

    ``resume=True`` keeps what an interrupted attempt left in the partial directory, for stages whose
    work is split into shards that complete atomically. ``partition`` places the output under
    ``<root>/partitions/<stage>/<partition>/`` (see :class:`RunLayout`); ``force=True`` rebuilds
    even a complete directory, which the commit then replaces.

    Building and committing happen under the output's lock (:meth:`RunLayout.lock_path`): of two
    processes (or threads) that reach the same output, one builds it while the other waits
    (``on_wait(message)`` is told once) and then, finding it complete, reuses it. A holder that dies
    releases the lock, and the next one resumes or clears what it left in the partial directory.
    """
    with building(
        layout,
        stage,
        fingerprint,
        code_version=code_version,
        config=config,
        upstream=upstream,
        resume=resume,
        partition=partition,
        force=force,
        on_wait=on_wait,
    ) as b:
        if b.outcome is None:
            b.commit(build(b.partial))
    return b.outcome


@contextlib.contextmanager
def staged_directory(out_dir: str | Path):
    """Build a directory beside ``out_dir`` and swap it in whole when the block succeeds (an existing
    ``out_dir`` is replaced); on any exception the staging directory is removed and ``out_dir`` is untouched.

        with staged_directory(out) as staging:
            write_files(staging)
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

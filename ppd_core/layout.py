"""Where every artifact lives: ``<root>/<stage>/<fingerprint>/`` (the design).

One component owns the storage layout so no stage invents paths. A stage writes into a hidden
sibling ``<root>/<stage>/.<fingerprint>.partial/`` and the directory is renamed into place when
complete (see :mod:`ppd_core.manifest`); ``<root>/<stage>/.<fingerprint>.lock`` is held meanwhile,
so one process at a time works in the partial directory (another waits, then reuses the output).
The run root also holds the local Prefect home (database, result records), so a run root is
self-contained and can be moved or deleted as one unit.

A stage run per date partition (backfills, :mod:`ppd_core.data.partitions`) writes the same kind of
directory one level down, beside that partition's lock and status files::

    <root>/partitions/<stage>/<partition>/<fingerprint>/      e.g. partitions/ingest/created_date=2023-05-01/
    <root>/partitions/<stage>/<partition>/.<fingerprint>.partial/
    <root>/partitions/<stage>/<partition>/status.json  .lock
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ppd_core.errors import InputError

RUN_CONFIG = "run_config.yaml"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).expanduser().resolve())

    def stage_root(self, stage: str) -> Path:
        return self.root / stage

    def stage_dir(self, stage: str, fingerprint: str, partition: str | None = None) -> Path:
        return self._base(stage, partition) / fingerprint

    def partial_dir(self, stage: str, fingerprint: str, partition: str | None = None) -> Path:
        return self._base(stage, partition) / f".{fingerprint}.partial"

    def lock_path(self, stage: str, fingerprint: str, partition: str | None = None) -> Path:
        """Held (``flock``) by the one process that builds and commits this output; see :mod:`ppd_core.locks`."""
        return self._base(stage, partition) / f".{fingerprint}.lock"

    def _base(self, stage: str, partition: str | None) -> Path:
        return self.root / stage if partition is None else self.partition_dir(stage, partition)

    def partitions_root(self, stage: str) -> Path:
        """Per-partition outputs of ``stage``: one directory per partition key below it."""
        return self.root / "partitions" / stage

    def partition_dir(self, stage: str, partition: str) -> Path:
        """One partition's outputs (one per fingerprint), its ``status.json`` and ``.lock``."""
        return self.partitions_root(stage) / partition

    @property
    def run_config(self) -> Path:
        """The resolved config of the latest ``ppd run`` on this root (later commands start from it)."""
        return self.root / RUN_CONFIG

    @property
    def prefect_home(self) -> Path:
        return self.root / ".prefect"

    @property
    def prefect_db_lock(self) -> Path:
        """Held while a Prefect server creates or migrates this root's database (see :mod:`ppd_core.locks`)."""
        return self.prefect_home / ".db.lock"

    @property
    def prefect_results(self) -> Path:
        """Prefect result records (cache records) for this run root."""
        return self.prefect_home / "results"

    def stage_dirs(self, stage: str) -> list[Path]:
        """Every committed output directory of a stage, newest first."""
        base = self.stage_root(stage)
        if not base.is_dir():
            return []
        dirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)


def check_run_root(root: str | Path) -> Path:
    """``root`` made absolute, or an :class:`InputError` when it (or a directory it would be created in)
    exists as something other than a directory."""
    root = Path(root).expanduser().resolve()
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == root else f"cannot be created: {path} is"
                raise InputError(f"run root {root} {where} a file, not a directory")
            break
    return root

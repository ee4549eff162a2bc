"""Where every artifact lives: ``<root>/<stage>/<fingerprint>/`` (DESIGN.md section 2).

One component owns the storage layout so no stage invents paths. A stage writes into a hidden
sibling ``<root>/<stage>/.<fingerprint>.partial/`` and the directory is renamed into place when
complete (see :mod:`ppd_core.manifest`). The run root also holds the local Prefect home (database,
result records), so a run root is self-contained and can be moved or deleted as one unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).expanduser().resolve())

    def stage_root(self, stage: str) -> Path:
        return self.root / stage

    def stage_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    def partial_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / f".{fingerprint}.partial"

    @property
    def prefect_home(self) -> Path:
        return self.root / ".prefect"

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

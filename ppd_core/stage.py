"""What a stage is: one object that names the stage, its code version, the stages it reads, the config it
depends on and its body. The stages are registered in one place (:mod:`ppd_core.stages`); the pipeline
(:mod:`ppd_core.pipeline`) plans and executes any of them the same way, and the Prefect flow builds one
generic task per registered stage.

Adding a stage = one module under ``ppd_core/stages/`` that defines a :class:`Stage`, plus its line in the
registry. Its body takes the resolved config, the upstream output directories and its partial output
directory, and returns the counts recorded in its manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ppd_core.config import PPDConfig

Progress = Callable[[int, int], None]
MapFn = Callable[[Callable, Sequence], Iterable]


@dataclass(frozen=True)
class StageContext:
    """Everything a stage body gets besides its output directory."""

    cfg: PPDConfig
    dirs: Mapping[str, Path]  # upstream stage -> its complete output directory
    inputs: Mapping[str, Any] = field(default_factory=dict)  # resolved at planning (e.g. the source files)
    progress: Progress | None = None  # (done, total) callback
    map_fn: MapFn | None = None  # fans shard work out over an orchestrator's workers


@dataclass(frozen=True)
class Summary:
    """What a stage shows about its result in a dashboard: a table, a text or a link, under ``key``. Plain
    data, so the library does not depend on the orchestrator that displays it."""

    key: str
    description: str = ""
    rows: list[dict] | None = None
    markdown: str | None = None
    link: str | None = None


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    - ``version``: bump it when the code changes what the stage writes (its outputs, and everything
      downstream, are then recomputed);
    - ``upstream(cfg)``: the stages whose outputs it reads, for this config;
    - ``section(cfg)``: the config its output depends on (volatile fields are dropped when fingerprinting);
    - ``run(ctx, out) -> counts``: the body, writing into the partial directory ``out``;
    - ``resumable``: its partial directory survives a crash (its shards or checkpoints complete atomically);
    - ``progress``: what its progress callback counts (None: it reports none);
    - ``workers(cfg)``: how many shards it runs at once through ``ctx.map_fn`` (None, or 0 for a config: no
      ``map_fn``, the body runs its shards in its own process);
    - ``summarize(counts, directory)``: what a dashboard shows about a result;
    - ``tags``: labels for the orchestrator (e.g. "gpu");
    - ``resolve(cfg, dirs) -> (inputs, extra)``: work done once at planning, given the upstream output
      directories, e.g. listing source files; ``inputs`` reach the body as ``ctx.inputs`` and ``extra``
      joins the fingerprint (new or changed files re-run it);
    - ``brief(counts)``: the one count that matters, in words, for the console;
    - ``joint(names, contexts, outs) -> [counts]``: builds several due stages sharing this body in one go
      (e.g. the train stages in one launch), each into its own partial directory, with the same results as
      ``run`` on each; :func:`ppd_core.pipeline.execute_joint` uses it.
    """

    name: str
    version: str
    upstream: Callable[[PPDConfig], tuple[str, ...]]
    section: Callable[[PPDConfig], BaseModel | dict]
    run: Callable[[StageContext, Path], dict]
    resumable: bool = False
    progress: str | None = None
    workers: Callable[[PPDConfig], int] | None = None
    summarize: Callable[[dict, Path], list[Summary]] | None = None
    tags: tuple[str, ...] = ()
    resolve: Callable[[PPDConfig, Mapping[str, Path]], tuple[dict, dict]] | None = None
    brief: Callable[[dict], str] | None = None
    joint: Callable[[Sequence[str], Sequence[StageContext], Sequence[Path]], list[dict]] | None = None

    def describe(self, counts: dict) -> str:
        """The one line a person reads about a result (``brief``); empty when the counts lack its keys."""
        if self.brief is None:
            return ""
        try:
            return self.brief(counts)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return ""


class ProgressCount:
    """Counts done units of a known total for a stage body and reports ``(done, total)`` to its progress
    callback (a no-op without one); bodies call :meth:`add` once per chunk of work, not per row."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, int(total), 0

    def add(self, n: int = 1) -> None:
        self.done += int(n)
        if self.progress is not None:
            self.progress(self.done, self.total)


def no_upstream(cfg: PPDConfig) -> tuple[str, ...]:
    return ()


def counts_table(keys: Sequence[str], key: str, description: str) -> Callable[[dict, Path], list[Summary]]:
    """A ``summarize`` that shows the named counts as a two-column table."""

    def summarize(counts: dict, directory: Path) -> list[Summary]:
        rows = [{"count": k, "value": str(counts.get(k))} for k in keys]
        return [Summary(key, f"{description}, {directory}", rows=rows)]

    return summarize

"""Cross-process locks on files (``flock`` through :mod:`filelock`): one holder at a time, and a holder
that dies (``kill -9`` included) releases its lock with its file descriptors, so a lock is never stale.

Used for a stage's working directory (:func:`ppd_core.manifest.run_stage`), a date partition
(:mod:`ppd_core.data.partitions`) and the first creation of a run root's Prefect database::

    with hold(path, on_wait=print, what="ingest 8a8df7ae"):
        ...  # alone here; a second process waits (on_wait says so once), then runs this block after us

The lock file stays in place after release (removing it would let two processes lock two inodes).
Two holders in one process (two threads) exclude each other too: every :func:`hold` opens its own
descriptor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ppd_core.errors import StageError


@contextmanager
def hold(
    path: str | Path,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    what: str | None = None,
) -> Iterator[None]:
    """Hold the lock ``path`` (created with its directory when missing); ``timeout`` None waits for ever.

    ``on_wait(message)`` is called once, before waiting, when another holder has it; a ``timeout``
    that runs out raises :class:`~ppd_core.errors.StageError` naming ``what`` (default: the path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    what = what or str(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(f"{what} is locked by another process; waiting for it ({path})")
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise StageError(
                f"{what}: still locked by another process after {timeout:.0f}s ({path})"
            ) from None
    try:
        yield
    finally:
        lock.release()


def is_held(path: str | Path) -> bool:
    """Whether some process holds the lock ``path`` now (False when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False

"""Start distributed training as a subprocess in its own process group.

The `deepspeed` launcher (or torchrun) starts one worker process per rank running
``python -m <module> <args>``; gloo on CPU and nccl on GPU are chosen inside the worker. The launcher
runs in a new session, so cancelling the flow (or any exception, or Ctrl-C in the caller) kills
every rank with one ``killpg``: nothing is left holding a GPU.

The workers' output is streamed to the caller's stderr and a log file as it comes. A failed run is
reported in one line: the exit code, the last error line of that log and its path; the log is not
repeated. A worker that exits with an error (a bad checkpoint, a config the backbone refuses) failed
deterministically: :class:`~ppd_core.errors.StageError`, which the flow does not retry. A launcher killed
by a signal (the OOM killer, a preempted node) may succeed when run again: ``RuntimeError``, retried.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ppd_core.errors import StageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_command(
    launcher: str,
    module: str,
    args: Sequence[str],
    num_gpus: int = 1,
    hostfile: str | None = None,
    port: int | None = None,
) -> list[str]:
    """The launcher command line (``--num_gpus``/``--nproc_per_node`` and ``--hostfile`` passed through)."""
    port = port or free_port()
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
        if exe is None:
            raise StageError("the deepspeed launcher is not installed (pip install deepspeed)")
        cmd = [exe, "--master_port", str(port)]
        if hostfile:
            if not Path(hostfile).is_file():
                raise StageError(f"hostfile not found: {hostfile}")
            cmd += ["--hostfile", hostfile]
        else:
            cmd += ["--num_gpus", str(num_gpus)]
        return [*cmd, "--module", module, *args]
    if launcher == "torchrun":
        if hostfile:
            raise StageError(
                "--hostfile needs the deepspeed launcher; torchrun takes --nnodes/--rdzv options instead"
            )
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_gpus),
            "--master_port", str(port), "-m", module, *args,
        ]  # fmt: skip
    raise StageError(f"unknown launcher {launcher!r}")


class Terminated(BaseException):
    """SIGTERM arrived while training ran (a Prefect runner cancelling the flow run sends it)."""


@contextlib.contextmanager
def _sigterm_raises():
    """In the main thread, turn SIGTERM into :class:`Terminated` so the group is killed before we exit
    (the default action would end this process and orphan the ranks)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, grace_s: float = 10.0
) -> None:
    """Run ``cmd`` in its own session, streaming output to ``log_path`` (and this process's stderr).

    Raises StageError on a non-zero exit; kills the whole process group if interrupted (an exception,
    Ctrl-C, or SIGTERM to this process)."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log, _sigterm_raises():
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
            rc = proc.wait()
        except BaseException:
            kill_group(proc, grace_s)
            raise
    if rc == 0:
        return
    reason = last_error_line(log_path.read_bytes()[-20000:].decode(errors="replace"))
    where = f"the full log, streamed above: {log_path}"
    if rc < 0 or rc in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
        raise RuntimeError(f"training was killed (exit code {rc}): {reason} ({where})")
    raise StageError(f"training exited with code {rc}: {reason} ({where})")


_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:|^[\w.]*Error$")


def last_error_line(log: str) -> str:
    """The line that says why a worker failed: the last ``SomeError: message`` line of its log that is not
    the launcher's own ``CalledProcessError`` about the worker's exit; else the last non-empty line."""
    lines = [_RANK_PREFIX.sub("", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if _ERROR_LINE.match(line) and "CalledProcessError" not in line:
            return line
    return lines[-1] if lines else "no output"


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

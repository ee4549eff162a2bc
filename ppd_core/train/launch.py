"""Start distributed training as a subprocess in its own process group.

The `deepspeed` launcher (or torchrun) starts one worker process per rank running
``python -m <module> <args>``; gloo on CPU and nccl on GPU are chosen inside the worker. The launcher
runs in a new session, so cancelling the flow (or any exception, or Ctrl-C in the caller) kills
every rank with one ``killpg``: nothing is left holding a GPU.

A caller killed outright (``kill -9``) runs no handler, so every level also dies with its parent: the
launcher gets SIGTERM through the Linux parent-death signal (``prctl(PR_SET_PDEATHSIG)``, set by a
small exec wrapper), and each rank runs :func:`exit_with_parent`, a watchdog thread that ends the rank
when the launching process (named in ``$PPD_PARENT_PROCESS``, pid and start time) or the rank's own
parent is gone. The launchers' intermediate processes are third-party; the ranks' watchdog does not
depend on them. Without it, orphaned ranks went on training into the stage's partial directory while a
rerun trained into it a second time.

The workers' output is streamed to the caller's stderr and a log file as it comes. A failed run is
reported in one line: the exit code, the last error line of that log and its path; the log is not
repeated. A worker that exits with an error (a bad checkpoint, a config the backbone refuses) failed
deterministically: :class:`~ppd_core.errors.StageError`, which the flow does not retry. A launcher killed
by a signal (the OOM killer, a preempted node) may succeed when run again: ``RuntimeError``, retried.

The rendezvous port is chosen free (bound to port 0 and released) and bound by the ranks seconds later, after
their imports; in between another process can take it (an outgoing connection gets its local port from the
same range; two runs on one machine launched at once failed this way). A launch whose ranks report the port in
use is started again on a fresh port (:func:`launch_ranks`), a few times, and is transient after that.
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
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ppd_core.errors import StageError

PORT_ATTEMPTS = 3  # launches on fresh ports before a taken rendezvous port is left to the flow's retries
_PORT_TAKEN = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)


class PortTaken(RuntimeError):
    """The ranks could not bind the rendezvous port chosen for them (taken after it was chosen): transient."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_command(
    launcher: str,
    module: str,
    args: Sequence[str],
    num_gpus: int = 1,
    hostfile: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command (and its extra environment) that starts the ranks. One local rank needs no launcher: the
    rank itself starts, with the environment a launcher would give it (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), and still trains through
    ``deepspeed.initialize``; this saves the launcher's own start (about 5 s per train stage on 2 CPU cores).
    Several ranks or nodes go through :func:`build_command`."""
    if num_gpus == 1 and not hostfile:
        env = {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        return [sys.executable, "-u", "-m", module, *args], env
    return build_command(launcher, module, args, num_gpus, hostfile), {}


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


def launch_ranks(
    launcher: str,
    module: str,
    args: Sequence[str],
    log_path: Path,
    num_gpus: int = 1,
    hostfile: str | None = None,
    env: Mapping[str, str] | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> None:
    """Start the ranks (:func:`rank_command`) and wait for them (:func:`run`); a launch that fails because its
    rendezvous port was taken is started again on a fresh port, up to :data:`PORT_ATTEMPTS` launches."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        cmd, rank_env = rank_command(launcher, module, args, num_gpus, hostfile)
        try:
            run(cmd, log_path, env={**(env or {}), **rank_env})
            return
        except PortTaken as e:
            if attempt == PORT_ATTEMPTS:
                raise
            if on_retry is not None:
                on_retry(f"{e}; launching again on a fresh port ({attempt + 1} of {PORT_ATTEMPTS})")


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


# -------------------------------------------------------------------------------- dying with the parent

PARENT_ENV = "PPD_PARENT_PROCESS"
EXIT_ORPHANED = 3  # a rank's exit code when its launching process was gone
# exec wrapper: the parent-death signal survives exec, so the launcher is ended when the thread of ours that
# started it (blocked in run() until the launcher exits) dies with its process
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, ctypes.c_ulong(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(128 + signal.SIGTERM)  # the parent died before prctl\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(cmd: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", _PDEATHSIG_EXEC, str(os.getpid()), *cmd]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), "" where /proc is absent, None if no such process
    is running (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:  # no procfs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    return None if fields[0] in ("Z", "X") else fields[19]


def process_token(pid: int | None = None) -> str:
    """``host:pid:start time`` naming one process (a later process reusing the pid does not match)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or ''}"


def process_alive(token: str) -> bool:
    """Whether the process named by :func:`process_token` still runs (assumed so when it is on another host)."""
    host, pid, start = token.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    now = _start_time(int(pid))
    return now is not None and (not start or not now or now == start)


def watch_parent(
    token: str | None,
    on_gone: Callable[[str], None],
    interval_s: float = 1.0,
) -> threading.Thread:
    """Start a daemon thread that calls ``on_gone(reason)`` once, when the process named by ``token`` (if
    any) or this process's parent is gone; the thread then ends."""
    ppid = os.getppid()

    def gone() -> str | None:
        if token and not process_alive(token):
            return f"the ppd process that launched training ({token}) is gone"
        if os.getppid() != ppid:
            return f"its parent process {ppid} is gone"
        return None

    def loop() -> None:
        while (reason := gone()) is None:
            time.sleep(interval_s)
        on_gone(reason)

    thread = threading.Thread(target=loop, name="ppd-parent-watchdog", daemon=True)
    thread.start()
    return thread


def exit_with_parent(interval_s: float = 1.0) -> threading.Thread:
    """In a rank: end this process (exit code :data:`EXIT_ORPHANED`) as soon as the process that launched
    training (``$PPD_PARENT_PROCESS``) or this rank's parent is gone, so that no rank outlives a killed ``ppd``."""

    def end(reason: str) -> None:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"ppd rank {os.getpid()}: exiting, {reason}\n")
            sys.stderr.flush()
        os._exit(EXIT_ORPHANED)

    return watch_parent(os.environ.get(PARENT_ENV), end, interval_s)


def ranks_lock_path(run_dir: Path) -> Path:
    """Beside the run directory: every rank holds it shared while it runs (:func:`hold_as_rank`)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f"{run_dir.name}.ranks.lock")


def hold_as_rank(path: Path) -> int:
    """In a rank: hold ``path`` shared until this process ends (the OS releases it, ``kill -9`` included)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def wait_for_ranks(path: Path, on_wait: Callable[[str], None] | None = None) -> None:
    """Before launching into a run directory: wait until no rank of an earlier launch holds ``path`` (one
    whose launching process was killed ends within seconds, see :func:`exit_with_parent`)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(
                    f"training ranks of an earlier launch still run in {path.parent}; waiting for them to end"
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)  # releases the lock: the caller launches the next ranks while holding the stage's lock


def run(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, grace_s: float = 10.0
) -> None:
    """Run ``cmd`` in its own session, streaming output to ``log_path`` (and this process's stderr).

    Raises StageError on a non-zero exit; kills the whole process group if interrupted (an exception,
    Ctrl-C, or SIGTERM to this process). When this process dies without a chance to do that, the launcher
    gets SIGTERM (parent-death signal) and the ranks end themselves (:func:`exit_with_parent`)."""
    full_env = {**os.environ, **(env or {}), PARENT_ENV: process_token()}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log, _sigterm_raises():
        start = log.tell()  # this launch's output begins here (the log keeps earlier launches')
        proc = subprocess.Popen(
            _with_parent_death_signal(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
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
    with open(log_path, "rb") as log:
        log.seek(start)
        if _PORT_TAKEN.search(log.read().decode(errors="replace")):
            raise PortTaken(f"training could not bind its rendezvous port: {reason} ({where})")
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

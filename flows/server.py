"""A local Prefect server for one run root: start it, find it again, stop it.

``ppd ui`` starts ``prefect server start --host 127.0.0.1`` with ``PREFECT_HOME=<root>/.prefect``,
so the server's SQLite database is the one the embedded runs of that root wrote
(``<root>/.prefect/prefect.db``) and earlier runs show up in the dashboard. Its API URL is written
to ``<root>/.prefect/api_url``; :func:`live_api_url` returns it only while the server answers its
health check, so a stale file (a stopped or crashed server) falls back to the embedded mode. The file is
trusted only when it names a loopback address (``ppd ui`` serves on 127.0.0.1): any other host is
refused, so a run root copied from elsewhere cannot send its runs' configs to a remote server.

The server's pid, process start time and command line go to ``<root>/.prefect/server.pid.ppd``;
``ppd ui --stop`` signals that pid only while it is still that process (a pid reused by another
process, or an unverifiable record, is left alone and the record removed). A recorded URL is used only
while that recorded process is alive *and* listens on the URL's port, so a stale record (the server is
gone, another program took its port) or a foreign one (a URL copied from another root) is not trusted.

The other ``ppd`` commands reuse a live server of their root instead of paying for Prefect's temporary
server at each start (about 10 s). When none answers, :func:`ensure_server` starts one detached,
``python -m flows.server <root>`` (Prefect's own app under uvicorn, the same as ``prefect server
start``), records it like ``ppd ui`` does and leaves it running; it stops itself and removes its record
after ``run.server_idle_seconds`` (default 300) without a request and without a live
client. Each command that uses a server records its process under ``<root>/.prefect/clients/`` for its
lifetime, so a long stage that makes no API call for a while keeps its server. The check-and-start of
one command and the stop decision of the server both happen under the root's database lock, so a
command never adopts a server that is about to stop. ``run.server_idle_seconds=0`` keeps the former
behaviour (a temporary server per command).

Imports nothing from prefect at module level: the CLI calls it before Prefect reads its settings.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from ppd_core import locks
from ppd_core.errors import InputError, StageError
from ppd_core.layout import RunLayout
from ppd_core.manifest import atomic_write_bytes

API_URL_FILE = "api_url"
PID_FILE = "server.pid.ppd"
LOG_FILE = "server.log"
CLIENTS_DIR = "clients"
HOST = "127.0.0.1"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers ``GET <api_url>/health`` with ``true``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200 and response.read().strip() == b"true"
    except (OSError, urllib.error.URLError, ValueError):
        return False


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is http(s) on a loopback address (127.0.0.0/8, ::1 or localhost); no DNS lookup."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def live_api_url(root: str | Path) -> str | None:
    """The API URL recorded for this root (by ``ppd ui`` or :func:`ensure_server`), if that server answers
    and is the recorded process (:func:`recorded_server`). A recorded URL that is not on a loopback address
    is an :class:`InputError` (it is never contacted)."""
    path = RunLayout(root).prefect_home / API_URL_FILE
    try:
        url = path.read_text().strip()
    except OSError:
        return None
    if url and not is_loopback_url(url):
        raise InputError(
            f"{path} names {url!r}, not a loopback address; `ppd ui` only records 127.0.0.1 servers. "
            "Remove the file (or set PREFECT_API_URL to use a remote server on purpose)"
        )
    return url if url and healthy(url) and recorded_server(root, url) is not None else None


def recorded_server(root: str | Path, url: str) -> dict | None:
    """The root's server record (:data:`PID_FILE`) when its process is still the one recorded, serves this
    root's database (its ``PREFECT_HOME``) and listens on ``url``'s port; None otherwise (no record, an older
    bare-pid record, a pid reused by another process, a record or URL copied from another root)."""
    home = RunLayout(root).prefect_home
    try:
        record = json.loads((home / PID_FILE).read_text())
        port = urlsplit(url).port
        if not isinstance(record, dict) or port is None or not same_process(record):
            return None
        process = psutil.Process(int(record["pid"]))
        served = process.environ().get("PREFECT_HOME")
        serves = bool(served) and Path(served).resolve() == home.resolve()
        listening = process.net_connections(kind="inet")
    except (OSError, ValueError, TypeError, KeyError, psutil.Error):
        return None
    ok = serves and any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in listening
    )
    return record if ok else None


def dashboard_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_env(home: Path, host: str, port: int) -> dict[str, str]:
    """The server's environment: its home, address, and the API URL its dashboard calls."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_UI_API_URL=f"http://{host}:{port}/api",  # else the dashboard calls port 4200
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def start_server(
    root: str | Path, port: int = 4200, host: str = HOST, timeout: float = 120.0
) -> tuple[subprocess.Popen, str]:
    """Start a Prefect server (SQLite under ``<root>/.prefect``) and wait for its health check.

    The server runs in its own process group; its log goes to ``<root>/.prefect/server.log``.
    Returns the process and the API URL, which is also written to ``<root>/.prefect/api_url``."""
    if port_in_use(port, host):
        raise InputError(f"port {port} on {host} is already in use; pick another with --port")
    # the server creates or migrates the database as it starts: one process at a time (see cli.start_embedded_api)
    with locks.hold(RunLayout(root).prefect_db_lock, what="the run root's Prefect database"):
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
        return _spawn(root, command, host, port, timeout, {})


def _spawn(
    root: str | Path, command: list[str], host: str, port: int, timeout: float, extra: dict
) -> tuple[subprocess.Popen, str]:
    """Start ``command`` as the root's server and record it once it answers (the caller holds the db lock)."""
    home = RunLayout(root).prefect_home
    home.mkdir(parents=True, exist_ok=True)
    api = f"http://{host}:{port}/api"
    with open(home / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=server_env(home, host, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while not healthy(api, timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc.pid)
            tail = (home / LOG_FILE).read_text(errors="replace")[-2000:]
            raise StageError(f"the Prefect server did not start (see {home / LOG_FILE}):\n{tail}")
        time.sleep(0.2)
    atomic_write_bytes(home / API_URL_FILE, api.encode())
    atomic_write_bytes(home / PID_FILE, json.dumps({**process_record(proc.pid), **extra}).encode())
    return proc, api


def ensure_server(root: str | Path, idle: float, timeout: float = 120.0) -> tuple[str, bool]:
    """The API URL of a live server of this root, started detached (stopping itself after ``idle`` seconds
    unused) when none answers; this process is registered as its client until it exits. Returns the URL and
    whether it was started here."""
    lock = RunLayout(root).prefect_db_lock
    started = False
    with locks.hold(lock, what="the run root's Prefect database"):
        url = live_api_url(root)
        if url is None:
            port = free_port()
            command = [sys.executable, "-m", "flows.server", str(Path(root).resolve()), "--port", str(port)]
            _, url = _spawn(
                root, [*command, "--idle", str(idle)], HOST, port, timeout, {"idle_seconds": idle}
            )
            started = True
        register_client(root)
    return url, started


def clients_dir(root: str | Path) -> Path:
    return RunLayout(root).prefect_home / CLIENTS_DIR


def register_client(root: str | Path) -> None:
    """Record this process as a user of the root's server (removed when it exits; a killed process's record
    is recognised as dead by :func:`live_clients`)."""
    path = clients_dir(root) / f"{os.getpid()}.json"
    atomic_write_bytes(path, json.dumps(process_record(os.getpid())).encode())
    atexit.register(path.unlink, missing_ok=True)


def live_clients(root: str | Path) -> list[int]:
    """Pids of the processes registered as clients that still run; the records of the others are removed."""
    alive = []
    directory = clients_dir(root)
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and same_process(record):
            alive.append(int(record["pid"]))
        else:
            path.unlink(missing_ok=True)
    return alive


def process_record(pid: int) -> dict:
    """What identifies a running process beyond its pid (pids are reused): its start time and command line."""
    p = psutil.Process(pid)
    with p.oneshot():
        return {"pid": pid, "create_time": p.create_time(), "cmdline": p.cmdline()}


def same_process(record: dict) -> bool:
    """Whether the process ``record`` (:func:`process_record`) describes is still running."""
    try:
        p = psutil.Process(int(record["pid"]))
        with p.oneshot():
            return (
                abs(p.create_time() - float(record["create_time"])) < 0.1 and p.cmdline() == record["cmdline"]
            )
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def stop_process(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    return
            except ChildProcessError:  # not our child: poll for its exit instead
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.2)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def wait_foreground(root: str | Path, proc: subprocess.Popen) -> None:
    """Wait on a server started here until it exits or Ctrl-C / SIGTERM; then stop it and forget it."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop_process(proc.pid)
    finally:
        forget(root)


def forget(root: str | Path) -> None:
    """Remove the recorded URL and pid (the CLI then uses the embedded mode again)."""
    home = RunLayout(root).prefect_home
    for name in (API_URL_FILE, PID_FILE):
        (home / name).unlink(missing_ok=True)


def stop_server(root: str | Path) -> str:
    """Stop the server ``ppd ui`` started for this root, if the recorded process is still that server;
    the record is removed either way. Returns what was done, in words."""
    path = RunLayout(root).prefect_home / PID_FILE
    try:
        text = path.read_text()
    except OSError:
        forget(root)
        return "no server recorded for this root"
    try:
        record = json.loads(text)
        pid = int(record["pid"])
    except (ValueError, TypeError, KeyError):
        forget(root)
        return f"{path} does not identify a process (an older or damaged record): nothing signalled, record removed"
    if not same_process(record):
        forget(root)
        return f"the recorded server (pid {pid}) is no longer running: nothing signalled, record removed"
    stop_process(pid)
    forget(root)
    return f"stopped the Prefect server (pid {pid})"


def serve_until_idle(root: Path, port: int, idle: float, host: str = HOST) -> None:
    """Run Prefect's server app for ``root`` on ``host:port`` until it has been unused for ``idle`` seconds:
    no HTTP request and no live client (:func:`live_clients`). Then, under the database lock, remove the
    root's record if it is still this process's, and stop. Started by :func:`ensure_server`, in the
    environment of :func:`server_env`."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(final=True)
    last = [time.monotonic()]

    async def tracked(scope, receive, send):
        if scope["type"] == "http":
            last[0] = time.monotonic()
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(tracked, host=host, port=port, log_level="warning", lifespan="on"))
    me = process_record(os.getpid())

    def watch() -> None:
        while not server.should_exit:
            time.sleep(max(0.2, min(5.0, idle / 4)))
            if live_clients(root):
                last[0] = time.monotonic()
            if time.monotonic() - last[0] < idle:
                continue
            # a command holding the lock is checking or starting a server: try again next round
            with contextlib.suppress(StageError), locks.hold(RunLayout(root).prefect_db_lock, timeout=0):
                if live_clients(root) or time.monotonic() - last[0] < idle:
                    continue
                if _is_own_record(root, me):
                    forget(root)
                server.should_exit = True

    threading.Thread(target=watch, name="idle-watch", daemon=True).start()
    server.run()


def _is_own_record(root: Path, me: dict) -> bool:
    try:
        record = json.loads((RunLayout(root).prefect_home / PID_FILE).read_text())
        return all(record.get(k) == me[k] for k in ("pid", "cmdline")) and same_process(record)
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.server", description=serve_until_idle.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle", type=float, required=True)
    args = parser.parse_args(argv)
    serve_until_idle(args.root, args.port, args.idle)


if __name__ == "__main__":
    main()

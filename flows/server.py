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
process, or an unverifiable record, is left alone and the record removed).

Imports nothing from prefect: the CLI calls it before Prefect reads its settings.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
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
    """The API URL recorded by ``ppd ui`` for this root, if that server answers. A recorded URL that is not
    on a loopback address is an :class:`InputError` (it is never contacted)."""
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
    return url if url and healthy(url) else None


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
    home = RunLayout(root).prefect_home
    home.mkdir(parents=True, exist_ok=True)
    if port_in_use(port, host):
        raise InputError(f"port {port} on {host} is already in use; pick another with --port")
    api = f"http://{host}:{port}/api"
    # the server creates or migrates the database as it starts: one process at a time (see cli.start_embedded_api)
    with locks.hold(RunLayout(root).prefect_db_lock, what="the run root's Prefect database"):
        with open(home / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
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
            time.sleep(0.5)
    atomic_write_bytes(home / API_URL_FILE, api.encode())
    atomic_write_bytes(home / PID_FILE, json.dumps(process_record(proc.pid)).encode())
    return proc, api


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

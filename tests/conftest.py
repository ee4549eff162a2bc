"""Helpers shared by several test packages."""

from __future__ import annotations

import os
import shutil
import subprocess

# Each `ppd` command the tests start on a new root would leave that root's background Prefect server up for
# run.server_idle_seconds (300 s by default); in the suite they stop after 30 s unused instead.
os.environ.setdefault("PPD_RUN__SERVER_IDLE_SECONDS", "30")


def chromium_binary() -> str | None:
    """Debian's chromium, installed with apt-get when missing (None if that fails)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(cmd, capture_output=True, env=env, timeout=900).returncode != 0:
            return None
    return shutil.which("chromium")


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its reaper counts as ended)."""
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"

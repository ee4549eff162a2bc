"""Pipeline benchmark (`make bench`): the whole default DAG on the embedded world, first run then cached
run, in one go. Writes benchmarks/results/pipeline.json: wall time and peak memory (RSS of the `ppd`
process and all its children, sampled every 0.2 s) of each run and of each stage within it.

the design: the first run under 10 minutes on 2 CPU cores with peak memory under 6 GiB, and
the cached run under 5% of the first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
PPD = str(Path(sys.executable).with_name("ppd"))


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and its descendants (the training ranks included)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def timed_run(root: Path, extra: list[str]) -> dict:
    """Run `ppd run --json` once; return its report plus wall time and an RSS trace."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("PREFECT_API_URL", None)
    start = time.time()
    proc = subprocess.Popen(
        [PPD, "run", "--root", str(root), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    samples: list[tuple[float, int]] = []
    ps = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                samples.append((time.time(), tree_rss(ps)))
            except psutil.Error:
                break
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.time() - start
    sampler.join(2)
    if proc.returncode != 0:
        raise SystemExit(f"ppd run failed with code {proc.returncode}")
    report = json.loads(out.strip().splitlines()[-1])
    stages = []
    for s in report["stages"]:
        lo, hi = s["started"], s["started"] + s["seconds"]
        peak = max((r for t, r in samples if lo <= t <= hi), default=0)
        stages.append(
            {
                "stage": s["name"],
                "cached": s["cached"],
                "seconds": s["seconds"],
                "peak_rss_mib": round(peak / 2**20, 1),
            }
        )
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(max((r for _, r in samples), default=0) / 2**20, 1),
        "stages": stages,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path, default=None, help="run root (default: a fresh temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override, repeatable")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    extra = [a for s in args.sets for a in ("--set", s)]
    with tempfile.TemporaryDirectory(prefix="ppd-bench-") as tmp:
        root = args.root or Path(tmp) / "run"
        first = timed_run(root, extra)
        cached = timed_run(root, extra)
    result = {
        "cpu_count": os.cpu_count(),
        "first": first,
        "cached": cached,
        "cached_over_first": round(cached["wall_s"] / first["wall_s"], 4),
        "targets": {"first_wall_s_max": 600, "peak_rss_mib_max": 6144, "cached_over_first_max": 0.05},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("first", "cached")}, indent=2))
    print(f"first {first['wall_s']} s (peak {first['peak_rss_mib']} MiB), cached {cached['wall_s']} s")


if __name__ == "__main__":
    main()

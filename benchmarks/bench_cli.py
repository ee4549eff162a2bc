"""How long a `ppd` command takes when there is nothing to compute (`make bench`): a fully cached
`ppd run` (synthesize and ingest of a tiny world) and `ppd status`, before and after the root's Prefect
server is reused. "before": `run.server_idle_seconds=0`, Prefect's temporary server started in each
command (the former behaviour); "after": the root's background server, started by the first command and
reused by the next ones. Writes benchmarks/results/cli_latency.json (median of `--repeat` calls each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cli_latency.json"
PPD = str(Path(sys.executable).with_name("ppd"))
TINY = ["--set", "world.num_users=8", "--set", "world.mean_pairs_per_user=12"]
STAGES = "synthesize,ingest"


def timed(args: list[str], idle: float) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PPD_RUN__SERVER_IDLE_SECONDS=str(idle))
    start = time.perf_counter()
    proc = subprocess.run([PPD, *args], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ppd {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return round(wall, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ppd-bench-cli-") as tmp:
        root = Path(tmp) / "run"
        run = ["run", "--root", str(root), "--stages", STAGES, *TINY, "--json"]
        status = ["status", "--root", str(root), "--json"]
        first_run = timed(run, idle=0)  # computes the stages (temporary server)
        before = {
            "cached_run_s": [timed(run, idle=0) for _ in range(args.repeat)],
            "status_s": [timed(status, idle=0) for _ in range(args.repeat)],
        }
        try:
            starting = timed(status, idle=300)  # no server yet: this command starts it
            after = {
                "cached_run_s": [timed(run, idle=300) for _ in range(args.repeat)],
                "status_s": [timed(status, idle=300) for _ in range(args.repeat)],
            }
        finally:
            timed(["ui", "--stop", "--root", str(root)], idle=0)
    result = {
        "what": f"ppd run --stages {STAGES} (all cached, tiny world) and ppd status, wall seconds",
        "machine_cpus": os.cpu_count(),
        "first_run_s": first_run,
        "before_temporary_server": {
            **before,
            **{k + "_median": statistics.median(v) for k, v in before.items()},
        },
        "after_reused_server": {
            **after,
            **{k + "_median": statistics.median(v) for k, v in after.items()},
            "first_command_starting_the_server_s": starting,
        },
    }
    result["speedup_cached_run"] = round(
        result["before_temporary_server"]["cached_run_s_median"]
        / result["after_reused_server"]["cached_run_s_median"],
        2,
    )
    result["speedup_status"] = round(
        result["before_temporary_server"]["status_s_median"]
        / result["after_reused_server"]["status_s_median"],
        2,
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

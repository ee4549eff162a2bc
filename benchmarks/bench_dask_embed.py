"""Embed throughput over Dask worker processes (`run.task_runner: dask`): the embed stage's shards mapped
over a local cluster of 1 and then 2 workers, each pinned to its own device (on a CPU machine each takes
its share of the cores), beside the thread runner. The same shards each time (the output is removed in
between, so nothing is reused); the ratio 2 workers / 1 worker comes from one run of this script.
Writes benchmarks/results/dask_embed.json (``--device cuda`` on a GPU machine: dask_embed_cuda.json).

Wall time covers the whole stage, the cluster's start (spawning the workers, importing torch, loading the
embedder in each) included: that fixed cost is what a stage pays per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
EMBEDDER = "{name: generate64, kind: vlm, readout: generate, max_new_tokens: 64}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=96, help="world.num_users (shot sets grow with it)")
    ap.add_argument("--shard-sets", type=int, default=32)
    ap.add_argument("--device", default="auto", help="embed.device: auto (a worker's own device), cpu, cuda")
    ap.add_argument("--workers", default="1,2", help="dask worker counts to time")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or RESULTS / (
        "dask_embed_cuda.json" if args.device.startswith("cuda") else "dask_embed.json"
    )

    with tempfile.TemporaryDirectory(prefix="ppd-bench-dask-") as tmp:
        root = Path(tmp) / "run"
        from flows.server import ensure_server

        os.environ["PREFECT_API_URL"], _ = ensure_server(root, idle=60)  # before prefect is imported
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(root / ".prefect" / "results")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from flows.pipeline import pipeline_flow
        from flows.server import stop_server
        from ppd_core.config import load_config
        from ppd_core.devices import visible_devices

        def cfg(runner: str, workers: int):
            return load_config(
                None,
                [
                    f"run.root={root}",
                    f"run.task_runner={runner}",
                    f"world.num_users={args.users}",
                    f"embed.embedders=[{EMBEDDER}]",
                    "embed.default=generate64",
                    f"embed.shard_sets={args.shard_sets}",
                    f"embed.device={args.device}",
                    f"embed.shard_workers={workers}",
                ],
                environ={},
            )

        try:
            pipeline_flow(cfg("threads", 1), ["fewshot", "tiny_models"])  # upstream, not timed
            runs = {}
            for name, runner, workers in [("threads_1", "threads", 1)] + [
                (f"dask_{n}", "dask", int(n)) for n in args.workers.split(",")
            ]:
                t0 = time.perf_counter()
                report = pipeline_flow(cfg(runner, workers), ["embed"])
                wall = time.perf_counter() - t0
                embed = next(s for s in report if s["name"] == "embed")
                sets = embed["counts"]["sets_computed"]
                assert sets == embed["counts"]["shot_sets"] and not embed["cached"], embed
                runs[name] = {"seconds": round(wall, 2), "sets": sets, "sets_per_s": round(sets / wall, 2)}
                print(name, runs[name], flush=True)
                shutil.rmtree(embed["output_dir"])
        finally:
            stop_server(root)
    result = {
        "benchmark": "dask_embed",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "devices": visible_devices()},
        "setup": {
            "embedder": "tiny VLM, generate read-out (64 new tokens)",
            "users": args.users,
            "shard_sets": args.shard_sets,
            "device": args.device,
        },
        "runs": runs,
    }
    counts = sorted(int(n) for n in args.workers.split(","))
    if len(counts) > 1:
        result[f"dask_{counts[-1]}_over_dask_{counts[0]}"] = round(
            runs[f"dask_{counts[-1]}"]["sets_per_s"] / runs[f"dask_{counts[0]}"]["sets_per_s"], 3
        )
    result["dask_1_over_threads_1"] = round(runs["dask_1"]["sets_per_s"] / runs["threads_1"]["sets_per_s"], 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

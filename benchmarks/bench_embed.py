"""Embedding throughput on the tiny offline default: batched vs one set at a time, prefill vs generate,
with each read-out's probe accuracy beside it. Writes benchmarks/results/embed.json.

All ratios come from one process and one run (the machines are noisy); absolute numbers are for
orientation only. Run with ``make bench`` or ``.venv/bin/python benchmarks/bench_embed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from ppd_core import pipeline
from ppd_core.config import load_config
from ppd_core.embed.extract import EmbedInputs, load_embedder, read_shot_sets, to_shot_set
from ppd_core.manifest import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "embed.json"
READOUTS = {
    "prefill": "{name: prefill, kind: vlm, readout: prefill}",
    "image_diff": "{name: image_diff, kind: vlm, readout: image_diff}",
    "generate16": "{name: generate16, kind: vlm, readout: generate, max_new_tokens: 16}",
    "generate64": "{name: generate64, kind: vlm, readout: generate, max_new_tokens: 64}",
}


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", type=int, default=64, help="shot sets timed per measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cpu", help="torch device of the timed embedders (cpu, cuda)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as tmp:
        embedders = "[" + ", ".join(READOUTS.values()) + ", {name: truth, kind: true_attribute_diff}]"
        cfg = load_config(
            None, [f"run.root={tmp}", f"embed.embedders={embedders}", "embed.default=prefill"], environ={}
        )
        t0 = time.perf_counter()
        outcomes = pipeline.run_stages(cfg, ["probe"])
        pipeline_seconds = time.perf_counter() - t0
        dirs = {k: v.directory for k, v in outcomes.items()}
        inputs = EmbedInputs(
            dirs["fewshot"], dirs["ingest"], dirs["tiny_models"], dirs["synthesize"] / "world"
        )
        rows = read_shot_sets(inputs.fewshot).slice(0, args.sets).to_pylist()
        sets = [to_shot_set(r, inputs.ingest) for r in rows]
        summary = outcomes["probe"].manifest.counts["summary"]
        readouts = {}
        for name in READOUTS:
            spec = next(s for s in cfg.embed.embedders if s.name == name)
            embedder = load_embedder(spec, inputs, args.device)
            embedder.embed(sets[:2])  # load + warm up

            def batched(e=embedder):
                for i in range(0, len(sets), args.batch):
                    e.embed(sets[i : i + args.batch])

            def single(e=embedder):
                for s in sets:
                    e.embed([s])

            tb, ts = _time(batched, args.repeats), _time(single, args.repeats)
            probe = summary.get(name, {})
            readouts[name] = {
                "batched_sets_per_s": round(len(sets) / tb, 2),
                "single_sets_per_s": round(len(sets) / ts, 2),
                "batched_over_single": round(ts / tb, 3),
                "archetype_unseen_top1": probe.get("archetype_unseen/nearest_centroid@1"),
                "user_id_mlp_top1": probe.get("user_id/mlp@1"),
                "user_id_mlp_top16": probe.get("user_id/mlp@16"),
            }
        truth = summary.get("truth", {})
    prefill = readouts["prefill"]["batched_sets_per_s"]
    result = {
        "benchmark": "embed",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
        },
        "setup": {
            "sets": len(sets),
            "batch": args.batch,
            "repeats": args.repeats,
            "model": "tiny LLaVA-OneVision (offline default)",
        },
        "readouts": readouts,
        "prefill_over_generate16": round(prefill / readouts["generate16"]["batched_sets_per_s"], 3),
        "prefill_over_generate64": round(prefill / readouts["generate64"]["batched_sets_per_s"], 3),
        "ceiling_true_attribute_diff_archetype_unseen_top1": truth.get("archetype_unseen/nearest_centroid@1"),
        "chance_archetype_top1": next(iter(summary.values()), {}).get("archetype_unseen/chance@1"),
        "pipeline_seconds_to_probe": round(pipeline_seconds, 1),
        "targets": {
            "batched_over_single_at_least": 2.0,
            "met_by": [k for k, v in readouts.items() if v["batched_over_single"] >= 2.0],
        },
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

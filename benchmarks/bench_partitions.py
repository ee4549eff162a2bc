"""Partition benchmark (`make bench`): the cost of adding one creation day to a 30-day root, against a full
rerun, through the CLI. Writes benchmarks/results/partitions.json.

On the embedded world (its default 30 days), up to the `embed` stage:
1. setup: `ppd run --partitioned --end <day 29>` on a fresh root (29 days ingested, sets formed, embedded);
2. add one day: `ppd run --partitioned` on the same root (day 30 ingested, the union and the stages after
   it recomputed; existing shot sets keep their embeddings, only new sets are embedded);
3. full rerun: a plain `ppd run` over all 30 days on a fresh root that holds only the synthetic world and the
   tiny models of the first (copied: both runs start from the same models and data).
Reported per run: wall time of the command (Prefect's start included), the sum of its stage and partition
seconds, days ingested, shot sets, and sets embedded (computed) or reused; and whether the two 30-day results
hold the same shot sets and the same embeddings, bitwise; and how the added day's new sets split between
people and the relabel stage's reward users (whose pairs are resampled from the whole pool, so their sets are
redrawn when a day is added).

The embedder is `clip-diff` (tiny open_clip): cheap, and a fixed model, so its embeddings of a set are
reusable. The default `encoder` embedder is trained on the data by the `encoder` stage, so a new day retrains
it and every set is embedded again by the new encoder (its identity includes its weights).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ppd_core.config import load_config  # noqa: E402
from ppd_core.data.fewshot import read_fewshot  # noqa: E402
from ppd_core.embed.extract import read_embeddings  # noqa: E402
from ppd_core.rewards.relabel import REWARD_USERS_FILE  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "partitions.json"
PPD = str(Path(sys.executable).with_name("ppd"))
EMBEDDER = "clip-diff"
CONFIG = [
    "--set",
    f"embed.embedders=[{{name: {EMBEDDER}, kind: clip_diff}}]",
    "--set",
    f"embed.default={EMBEDDER}",
]


def timed_run(root: Path, extra: list[str]) -> dict:
    """`ppd run --json --stages embed` once: its report by stage and the command's wall time."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [PPD, "run", "--root", str(root), "--json", "--stages", "embed", *CONFIG, *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ppd run failed with code {proc.returncode}:\n{proc.stderr[-3000:]}")
    stages = {s["name"]: s for s in json.loads(proc.stdout.strip().splitlines()[-1])["stages"]}
    partitions = stages["ingest"].get("partitions") or {}
    embed = stages["embed"]["counts"]
    return {
        "wall_s": round(wall, 2),
        "stage_seconds": round(sum(s["seconds"] for s in stages.values()) + partitions.get("seconds", 0), 2),
        "seconds_by_stage": {
            **({"ingest_partitions": partitions["seconds"]} if partitions else {}),
            **{name: s["seconds"] for name, s in stages.items()},
        },
        "computed_stages": [name for name, s in stages.items() if not s["cached"]],
        "days_ingested": len(partitions["computed"]) if partitions else None,
        "shot_sets": embed["shot_sets"],
        "sets_computed": embed["sets_computed"],
        "sets_reused": embed["sets_reused"],
        "dirs": {name: s["output_dir"] for name, s in stages.items()},
    }


def same_results(a: dict, b: dict) -> dict:
    """Whether two runs hold the same shot sets and bitwise the same embeddings."""
    sets = [read_fewshot(r["dirs"]["fewshot"], "shot_sets").sort_by("shot_set_id") for r in (a, b)]
    emb = []
    for r in (a, b):
        table, values = read_embeddings(Path(r["dirs"]["embed"]), EMBEDDER)
        ids = table.column("shot_set_id").to_pylist()
        emb.append({sid: values[i].tobytes() for i, sid in enumerate(ids)})
    return {"same_shot_sets": sets[0].equals(sets[1]), "same_embeddings": emb[0] == emb[1]}


def new_sets_by_kind(before: dict, after: dict) -> dict:
    """The sets the added day formed, for people and for the relabel stage's reward users (which resample
    their pairs from the whole pool, so their sets are redrawn when a day is added)."""
    reward_users = set(
        pq.read_table(Path(after["dirs"]["relabel"]) / REWARD_USERS_FILE, columns=["user_id"])[
            "user_id"
        ].to_pylist()
    )
    before_sets = read_fewshot(before["dirs"]["fewshot"], "shot_sets").to_pylist()
    new = read_fewshot(after["dirs"]["fewshot"], "shot_sets").to_pylist()
    old, now = {s["shot_set_id"] for s in before_sets}, {s["shot_set_id"] for s in new}
    fresh = [s for s in new if s["shot_set_id"] not in old]
    people_before = {s["shot_set_id"] for s in before_sets if s["user_id"] not in reward_users}
    return {
        "new_sets_people": sum(s["user_id"] not in reward_users for s in fresh),
        "new_sets_reward_users": sum(s["user_id"] in reward_users for s in fresh),
        "people_sets_before": len(people_before),
        "people_sets_kept": len(people_before & now),
        "reward_user_sets_gone": len(old - now - people_before),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override, repeatable")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    extra = [a for s in args.sets for a in ("--set", s)]
    with tempfile.TemporaryDirectory(prefix="ppd-bench-partitions-") as tmp:
        part, full = Path(tmp) / "partitioned", Path(tmp) / "full"
        cfg = load_config(REPO / "configs" / "toy.yaml", args.sets)
        last = dt.date.fromisoformat(str(cfg.world.start_date)) + dt.timedelta(days=cfg.world.days - 1)
        before_last = (last - dt.timedelta(days=1)).isoformat()
        setup = timed_run(part, [*extra, "--partitioned", "--end", before_last])
        add_one = timed_run(part, [*extra, "--partitioned"])
        full.mkdir()
        for stage in ("synthesize", "tiny_models"):  # the same world and models, nothing else
            shutil.copytree(part / stage, full / stage)
        rerun = timed_run(full, extra)
        check = same_results(add_one, rerun)
        add_one["new_sets"] = new_sets_by_kind(setup, add_one)
    for r in (setup, add_one, rerun):
        r.pop("dirs")
    result = {
        "cpu_count": os.cpu_count(),
        "world": {"days": cfg.world.days, "users": cfg.world.num_users, "last_day": last.isoformat()},
        "embedder": f"{EMBEDDER} (tiny open_clip; the default encoder is retrained by new data: see the docstring)",
        "setup_29_days": setup,
        "add_one_day": add_one,
        "full_rerun": rerun,
        "add_over_full_wall": round(add_one["wall_s"] / rerun["wall_s"], 3),
        "add_over_full_stage_seconds": round(add_one["stage_seconds"] / rerun["stage_seconds"], 3),
        "add_over_full_sets_computed": round(add_one["sets_computed"] / max(rerun["sets_computed"], 1), 3),
        **check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    print(
        f"add one day: {add_one['wall_s']} s, {add_one['sets_computed']} sets embedded; "
        f"full rerun: {rerun['wall_s']} s, {rerun['sets_computed']} sets embedded"
    )


if __name__ == "__main__":
    main()

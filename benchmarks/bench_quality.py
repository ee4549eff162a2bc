"""Quality benchmark (`make bench`): the whole default pipeline on the embedded world for several world seeds,
and the figures a new user sees. Writes benchmarks/results/quality.json.

For each world seed (default 0, 1, 2: the result must not be tuned to one world) it runs the default DAG
(`world.seed=N`, every other value the toy preset's) through the plain-Python driver, then reads the
evaluation summary and the probe: win rate and reward gain (oracle judge, same prompt and seed, user-bootstrap
interval) of PPD, the K-shot ceiling (``ppd_shots``), the true-vector ceiling (``ppd_true``) and population DPO
against the base model, for seen and unseen users; PPD against population DPO; the held-out pair accuracy of
unseen users from their K shots for every embedder and for the population model; the quality targets met.

With ``--train-seeds 0 1 2`` every world is run once per trainers' seed (``train.seed``; Stage 1 is cached and
shared) and its figures and targets are those of the runs judged together (``ppd_core.evaluate.report.pooled``:
the comparisons of all runs, each user one bootstrap cluster), with each run's own figures under ``runs``. One
training run moves a new-user win rate by up to 0.15 (docs/quality.md), so a target is judged on the pool.

    python benchmarks/bench_quality.py                       # seeds 0 1 2, one after another
    python benchmarks/bench_quality.py --seeds 1 2 --jobs 2  # two worlds at once (one core each is slower)
    python benchmarks/bench_quality.py --train-seeds 0 1 2   # three training runs per world, judged pooled
    python benchmarks/bench_quality.py --seen-one-set        # also seen users conditioned on one 4-pair set

``--seen-one-set`` evaluates every run a second time with ``evaluate.seen_embedding=first`` (only the evaluation
recomputes) and records the seen users' figures under ``seen_one_set``: the same models given one of a seen
user's own sets, as a new user gives one. It separates what a single set costs from what being a new user costs,
on more users than the new users alone (docs/encoder.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality.json"
COMPARISONS = ("ppd_vs_base", "ppd_shots_vs_base", "ppd_true_vs_base", "dpo_vs_base", "ppd_vs_dpo")
FIELDS = ("win_rate", "win_rate_low", "win_rate_high", "reward_gain", "reward_gain_low", "reward_gain_high")

DRIVER = """
import json, sys
from ppd_core import pipeline
from ppd_core.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
out = pipeline.run_stages(cfg)
print(json.dumps({k: str(v.directory) for k, v in out.items()}))
"""


def run_world(seed: int, root: Path, config: str, extra: list[str]) -> dict:
    """Run the default DAG for one world seed; return its stage directories and wall time."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, config, f"run.root={root}", f"world.seed={seed}", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"world seed {seed} failed:\n{proc.stderr[-4000:]}")
    dirs = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"dirs": dirs, "wall_s": round(time.time() - started, 1)}


def evaluation(run: dict) -> tuple[Path, dict]:
    """A run's evaluation directory and its summary."""
    evaluate = Path(run["dirs"]["evaluate"])
    return evaluate, json.loads((evaluate / "summary.json").read_text())


def figures(summary: dict) -> dict:
    """The new-user figures of an evaluation summary (or of a pooled one) and its targets."""
    head = summary["headline"]
    out: dict = {}
    for group in ("seen", "unseen"):
        for comparison in COMPARISONS:
            row = head.get(f"{group}:{comparison}")
            if row:
                out[f"{group}:{comparison}"] = {k: round(float(row[k]), 4) for k in FIELDS}
    out["targets"] = summary["targets"]
    out["stage1"] = summary.get("stage1", {})
    return out


ONE_SET = "evaluate.seen_embedding=first"


def seen_figures(summary: dict) -> dict:
    """The seen users' comparisons of an evaluation summary (``--seen-one-set``)."""
    return {k: v for k, v in figures(summary).items() if k.startswith("seen:")}


def world_figures(seed: int, args: argparse.Namespace) -> dict:
    """One world: a run per trainers' seed; with several, the pooled figures beside each run's."""
    runs, evaluations, one_set, wall = {}, [], [], 0.0
    for train_seed in args.train_seeds or [None]:  # None: the config's own train.seed
        extra = args.extra if train_seed is None else [*args.extra, f"train.seed={train_seed}"]
        run = run_world(seed, args.root / f"world-{seed}", args.config, extra)
        evaluate, summary = evaluation(run)
        runs[str(train_seed)] = {"wall_s": run["wall_s"], **figures(summary)}
        evaluations.append(evaluate)
        wall += run["wall_s"]
        if args.seen_one_set:  # the same models, seen users given one set: only the evaluation recomputes
            again = run_world(seed, args.root / f"world-{seed}", args.config, [*extra, ONE_SET])
            first, first_summary = evaluation(again)
            runs[str(train_seed)]["seen_one_set"] = seen_figures(first_summary)
            one_set.append(first)
            wall += again["wall_s"]
    if len(runs) == 1:
        return next(iter(runs.values()))
    from ppd_core.config import load_config
    from ppd_core.evaluate.report import pooled

    pool = pooled(load_config(args.config, args.extra), evaluations)
    out = {"wall_s": round(wall, 1), **figures(pool)}
    if one_set:
        out["seen_one_set"] = seen_figures(pooled(load_config(args.config, [*args.extra, ONE_SET]), one_set))
    return {**out, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world seeds")
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="trainers' seeds (train.seed) per world, one run each (default: one run at the config's seed); "
        "with several, targets are judged on their pooled figures",
    )
    parser.add_argument(
        "--seen-one-set",
        action="store_true",
        help="also evaluate every run with seen users conditioned on one of their sets (evaluate.seen_embedding=first)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worlds run at once")
    parser.add_argument(
        "--root", type=Path, default=REPO / "runs" / "bench_quality", help="run roots' parent"
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "toy.yaml"))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.train_seeds and any(e.startswith("train.seed=") for e in args.extra):
        parser.error("--train-seeds sets train.seed; do not also pass it with --set")

    def one(seed: int) -> tuple[int, dict]:
        return seed, world_figures(seed, args)

    import torch

    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "config": Path(args.config).name,
        "overrides": args.extra,
        "train_seeds": args.train_seeds,
        "worlds": {},
    }
    worlds: dict[int, dict] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for seed, figs in pool.map(one, args.seeds):  # written after every world, so a cut run keeps them
            worlds[seed] = figs
            result["worlds"] = {str(s): worlds[s] for s in args.seeds if s in worlds}
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    for seed in args.seeds:
        w = worlds[seed]
        cells = []
        for key in (
            "unseen:ppd_vs_base",
            "unseen:ppd_shots_vs_base",
            "unseen:ppd_vs_dpo",
            "seen:ppd_vs_base",
        ):
            r = w.get(key)
            if r:
                cells.append(
                    f"{key} {r['win_rate']:.3f} gain {r['reward_gain']:.2f} [{r['reward_gain_low']:.2f}]"
                )
        r = w.get("seen_one_set", {}).get("seen:ppd_vs_base")
        if r:
            cells.append(f"seen users on one set {r['win_rate']:.3f} gain {r['reward_gain']:.2f}")
        met = sum(1 for t in w["targets"] if t["met"])
        pooled = f", {len(w['runs'])} training runs pooled" if "runs" in w else ""
        print(
            f"world {seed} ({w['wall_s']} s{pooled}): "
            + "; ".join(cells)
            + f"; targets met {met}/{len(w['targets'])}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

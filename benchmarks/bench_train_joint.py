"""The due train stages in one DeepSpeed launch vs one launch each, measured in one run of this script.

One upstream root (data, embeddings, pretrained toy backbone, latent cache) is built once and copied twice;
on one copy every train stage of the config runs alone (``pipeline.run_stages(cfg, [stage])``, one launch
each), on the other all of them run together (``pipeline.run_stages(cfg, stages)``: one launch through
``pipeline.execute_joint``). Reports the seconds of each, their ratio, and whether every stage's exported
adapter tensors are bitwise equal between the two (the files' metadata holds the config, whose run.root
differs, so the tensors are compared). Writes benchmarks/results/train_joint.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from ppd_core import pipeline
from ppd_core.config import load_config
from ppd_core.manifest import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "train_joint.json"
SMALL = [
    "world.num_users=24",
    "world.mean_pairs_per_user=30",
    "encoder.steps=100",
    "encoder.basis_steps=200",
    "pretrain.steps=5",
    "train.pairs_per_step=8",
    "train.log_every=1",
]


def _tensors(directory: Path) -> dict[str, str]:
    """sha256 of every exported tensor's bytes."""
    return {
        f"{p.relative_to(directory)}:{k}": hashlib.sha256(v.numpy().tobytes()).hexdigest()
        for p in sorted((directory / "export").rglob("*.safetensors"))
        for k, v in load_file(p).items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    overrides = [*SMALL, f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}"]
    out = {"benchmark": "train_joint", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "upstream"

        def cfg(root: Path):
            return load_config(None, [f"run.root={root}", *overrides], environ={})

        trains = [s for s in pipeline.expand(None, cfg(base)) if s.startswith("train_")]
        groups = [g for g in pipeline.joint_groups(cfg(base), trains) if len(g) > 1]
        if groups != [trains]:
            raise SystemExit(f"the config's train stages {trains} do not form one joint group: {groups}")
        t0 = time.perf_counter()
        pipeline.run_stages(
            cfg(base), sorted({u for s in trains for u in pipeline.upstream_of(s, cfg(base))})
        )
        upstream_s = time.perf_counter() - t0
        roots = {k: Path(tmp) / k for k in ("separate", "joint")}
        for root in roots.values():
            shutil.copytree(base, root, ignore=shutil.ignore_patterns("*.lock"))

        separate, each = {}, {}
        for name in trains:
            t0 = time.perf_counter()
            separate[name] = pipeline.run_stages(cfg(roots["separate"]), [name])[name]
            each[name] = round(time.perf_counter() - t0, 2)
        separate_s = sum(each.values())
        t0 = time.perf_counter()
        joint = pipeline.run_stages(cfg(roots["joint"]), trains)
        joint_s = round(time.perf_counter() - t0, 2)
        if any(separate[n].reused or joint[n].reused for n in trains):
            raise SystemExit("a train stage was reused, not trained: the timing would be meaningless")
        equal = {n: _tensors(separate[n].directory) == _tensors(joint[n].directory) for n in trains}
        nonempty = all(_tensors(joint[n].directory) for n in trains)
    out["setup"] = {
        "stages": trains,
        "overrides": overrides,
        "upstream_seconds": round(upstream_s, 2),
        "note": "seconds include each launch's DeepSpeed start-up, backbone and latent-cache load",
    }
    out["separate"] = {"seconds_each": each, "seconds": round(separate_s, 2)}
    out["joint"] = {"seconds": joint_s}
    out["separate_over_joint"] = round(separate_s / joint_s, 3)
    out["saved_seconds"] = round(separate_s - joint_s, 2)
    out["exports_bitwise_equal"] = {**equal, "all": all(equal.values()) and nonempty}
    atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

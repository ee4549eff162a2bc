"""Due train stages built in one launch (``pipeline.execute_joint``): each stage's output is bit-for-bit the
one a launch of its own makes, with its own manifest, and a complete member is reused, not retrained."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ppd_core import pipeline
from ppd_core.config import load_config
from ppd_core.manifest import is_complete

SETUP = [
    "world.num_users=16",
    "world.mean_pairs_per_user=30",
    "embed.embedders=[{name: truth, kind: true_preference}]",
    "embed.default=truth",
    "pretrain.steps=3",
    "pretrain.batch_size=16",
    "train.steps=4",
    "train.pairs_per_step=8",
    "train.checkpoint_every=2",
    "train.validate_every=2",
    "train.log_every=1",
]
TRAINS = ["train_ppd", "train_dpo", "train_sft"]  # two Diffusion-DPO runs sharing the reference, and SFT
TIMINGS = ("mean_step_s", "data_share_of_step")


def _cfg(root: Path):
    return load_config(None, [f"run.root={root}", *SETUP], environ={})


@pytest.fixture(scope="module")
def upstream_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint-upstream")
    pipeline.run_stages(_cfg(root), ["cache_latents", "embed"])
    return root


def _copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))  # copy2 keeps mtimes: still complete
    return dst


def _result(outcome) -> dict:
    d = outcome.directory
    # the tensors byte for byte (the file's metadata carries the config, whose run.root differs between roots)
    exports = {
        str(p.relative_to(d)): {
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in load_file(p).items()
        }
        for p in sorted((d / "export").rglob("*.safetensors"))
    }
    metrics = [
        {k: v for k, v in json.loads(line).items() if k != "step_s"}
        for line in (d / "metrics.jsonl").read_text().splitlines()
    ]
    validation = (d / "validation.jsonl").read_text()
    counts = {k: v for k, v in outcome.manifest.counts.items() if k not in TIMINGS}
    return {
        "dir": d.relative_to(d.parents[1]),
        "exports": exports,
        "metrics": metrics,
        "validation": validation,
        "counts": counts,
    }


def test_joint_launch_equals_separate_launches_and_reuses_a_complete_member(upstream_root, tmp_path):
    alone_root = _copy_root(upstream_root, tmp_path / "alone")
    alone = {}
    for name in TRAINS:  # one launch each (run_stages groups only the stages due together)
        alone |= {name: pipeline.run_stages(_cfg(alone_root), [name])[name]}
    assert all(not o.reused for o in alone.values())

    joint_root = _copy_root(upstream_root, tmp_path / "joint")
    assert pipeline.joint_groups(_cfg(joint_root), TRAINS) == [TRAINS]
    joint = pipeline.run_stages(_cfg(joint_root), TRAINS)
    for name in TRAINS:
        assert not joint[name].reused and is_complete(joint[name].directory)
        a, j = _result(alone[name]), _result(joint[name])
        assert j["exports"], f"{name}: no exported safetensors"
        assert len(j["metrics"]) == 4 and all(math_finite(m["loss"]) for m in j["metrics"])
        assert a == j, name
        assert (joint[name].directory / "launch.log").exists()
        spec = json.loads((joint[name].directory / "train_spec.json").read_text())
        assert [r["trainer"] for r in spec["runs"]] == ["ppd", "dpo", "sft"]
    assert len({o.manifest.digest for o in joint.values()}) == 3

    # a member already complete is reused; only the others are trained (together), with the same results
    mixed_root = _copy_root(upstream_root, tmp_path / "mixed")
    done = alone["train_dpo"].directory
    shutil.copytree(done, mixed_root / done.relative_to(alone_root))
    mixed = pipeline.run_stages(_cfg(mixed_root), TRAINS)
    assert mixed["train_dpo"].reused
    assert not mixed["train_ppd"].reused and not mixed["train_sft"].reused
    spec = json.loads((mixed["train_ppd"].directory / "train_spec.json").read_text())
    assert [r["trainer"] for r in spec["runs"]] == ["ppd", "sft"]
    for name in TRAINS:
        assert _result(mixed[name]) == _result(alone[name]), name

    # nothing due: every stage is reused, nothing launched
    again = pipeline.run_stages(_cfg(joint_root), TRAINS)
    assert all(o.reused for o in again.values())


def math_finite(x) -> bool:
    import math

    return isinstance(x, float) and math.isfinite(x)

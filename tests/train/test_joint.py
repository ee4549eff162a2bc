"""Due train stages built in one launch (``pipeline.execute_joint``): each stage's output is bit-for-bit the
one a launch of its own makes, with its own manifest, a complete member is reused, not retrained, and a
killed joint launch commits nothing and resumes every run to the same result."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def alone(upstream_root, tmp_path_factory):
    """Each train stage in a launch of its own (run_stages groups only the stages due together)."""
    root = _copy_root(upstream_root, tmp_path_factory.mktemp("joint-alone") / "r")
    outcomes = {name: pipeline.run_stages(_cfg(root), [name])[name] for name in TRAINS}
    assert all(not o.reused for o in outcomes.values())
    return root, {name: _result(o) for name, o in outcomes.items()}, outcomes


# about 2.5 minutes on 2 cores (six train launches); the default suite still trains jointly in every full small
# run (tests/evaluate/conftest.py's small_run trains all its trainers in one launch)
@pytest.mark.slow
def test_joint_launch_equals_separate_launches_and_reuses_a_complete_member(upstream_root, alone, tmp_path):
    alone_root, results, outcomes = alone
    # the comparison sees a difference: the runs differ from each other in every part but the layout
    for x, y in [("train_ppd", "train_dpo"), ("train_dpo", "train_sft")]:
        assert (
            results[x]["exports"] != results[y]["exports"] and results[x]["metrics"] != results[y]["metrics"]
        )

    joint_root = _copy_root(upstream_root, tmp_path / "joint")
    assert pipeline.joint_groups(_cfg(joint_root), TRAINS) == [TRAINS]
    joint = pipeline.run_stages(_cfg(joint_root), TRAINS)
    for name in TRAINS:
        assert not joint[name].reused and is_complete(joint[name].directory)
        a, j = results[name], _result(joint[name])
        assert j["exports"], f"{name}: no exported safetensors"
        assert len(j["metrics"]) == 4 and all(math_finite(m["loss"]) for m in j["metrics"])
        assert a == j, name
        assert (joint[name].directory / "launch.log").exists()
        spec = json.loads((joint[name].directory / "train_spec.json").read_text())
        assert [r["trainer"] for r in spec["runs"]] == ["ppd", "dpo", "sft"]
    assert len({joint[name].manifest.digest for name in TRAINS}) == 3

    # a member already complete is reused; only the others are trained (together), with the same results
    mixed_root = _copy_root(upstream_root, tmp_path / "mixed")
    done = outcomes["train_dpo"].directory
    shutil.copytree(done, mixed_root / done.relative_to(alone_root))
    mixed = pipeline.run_stages(_cfg(mixed_root), TRAINS)
    assert mixed["train_dpo"].reused
    assert not mixed["train_ppd"].reused and not mixed["train_sft"].reused
    spec = json.loads((mixed["train_ppd"].directory / "train_spec.json").read_text())
    assert [r["trainer"] for r in spec["runs"]] == ["ppd", "sft"]
    for name in TRAINS:
        assert _result(mixed[name]) == results[name], name

    # nothing due: every stage is reused, nothing launched
    again = pipeline.run_stages(_cfg(joint_root), TRAINS)
    assert all(o.reused for o in again.values())


_DRIVER = """
import sys
from ppd_core import pipeline
from ppd_core.config import load_config
pipeline.run_stages(load_config(None, sys.argv[2:], environ={}), sys.argv[1].split(","))
"""


@pytest.mark.slow  # a killed joint launch and its resume: about 2 minutes on 2 busy cores
def test_killed_joint_launch_commits_nothing_and_resumes_each_run(upstream_root, alone, tmp_path):
    _, results, _ = alone
    root = _copy_root(upstream_root, tmp_path / "killed")
    cfg = _cfg(root)
    manifests = {n: o.manifest for n, o in pipeline.run_stages(cfg, ["cache_latents", "embed"]).items()}
    plans = {n: pipeline.plan(cfg, n, manifests) for n in TRAINS}
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, ",".join(TRAINS), f"run.root={root}", *SETUP],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    # killed (the whole process group) once the last run has checkpointed step 2 of 4
    partial = {n: root / n / f".{p.fingerprint}.partial" for n, p in plans.items()}
    marker = partial[TRAINS[-1]] / "checkpoints" / "step-00000002" / "_COMPLETE"
    deadline = time.time() + 400
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the joint launch ended before its first checkpoint"
    for name in TRAINS:  # nothing committed, every run's checkpoint kept for the resume
        assert not is_complete(plans[name].directory), name
        assert (partial[name] / "checkpoints" / "step-00000002" / "_COMPLETE").exists(), name
    resumed = pipeline.run_stages(_cfg(root), TRAINS)
    for name in TRAINS:
        assert not resumed[name].reused and resumed[name].directory == plans[name].directory
        assert _result(resumed[name]) == results[name], name  # logs hold every step once, as uninterrupted


def math_finite(x) -> bool:
    import math

    return isinstance(x, float) and math.isfinite(x)

"""A small but complete run through `evaluate` (tiny world, few steps), shared by the evaluation tests."""

from __future__ import annotations

import os

import pytest

from ppd_core import pipeline
from ppd_core.config import load_config

SMALL_RUN = [
    "world.num_users=24",
    "world.mean_pairs_per_user=30",
    "pretrain.steps=30",
    "train.trainers=[ppd, dpo, sft]",  # every trainer, although the default leaves sft out
    "train.steps=6",
    "train.validate_every=6",
    "train.checkpoint_every=6",
    "evaluate.seen_users=4",
    "evaluate.unseen_users=4",
    "evaluate.prompts_per_user=2",
    "evaluate.seeds_per_prompt=1",
    "evaluate.interpolation_prompts=2",
    "evaluate.agreement_pairs=16",
    "evaluate.bootstrap=50",
    "encoder.steps=40",
    "encoder.basis_steps=100",
    "encoder.validate_every=20",
    "embed.embedders=[{name: encoder, kind: encoder}, {name: vlm-image_diff, kind: vlm, readout: image_diff}, "
    "{name: true-preference, kind: true_preference}]",
]


def small_config(root, *extra: str):
    return load_config(None, [f"run.root={root}", *SMALL_RUN, *extra], environ={})


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """(config, {stage: outcome}) of a complete small run. Under pytest-xdist (``make test``) every worker uses
    one root in the session's shared temporary directory: the first to get there computes each stage and the
    others wait on its stage locks and reuse the outputs, as two `ppd run` on one root do."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "eval-run"
    else:
        root = tmp_path_factory.mktemp("eval-run")
    cfg = small_config(root)
    return cfg, pipeline.run_stages(cfg, ["evaluate"])

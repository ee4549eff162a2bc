"""Every backbone through the real pipeline: ``ppd run --stages train_ppd`` (latent cache, DeepSpeed training,
export) on a tiny checkpoint in its real layout, then ``ppd generate --user`` (the export reloaded through the
backbone's one adapter mechanism, sampled and decoded). No stand-ins: the adapter the worker builds is the one
each backbone makes. A small world and few steps keep it fast; the toy backbone runs the same path in
tests/test_cli.py and the evaluate tests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ppd_core.models.cascade import build_tiny_cascade
from ppd_core.models.export import read_metadata
from ppd_core.models.sd import build_tiny_sd
from tests.test_cli import ppd

WORLD = ["--set", "world.num_users=12", "--set", "world.mean_pairs_per_user=12"]
FAST = [
    *WORLD,
    "--set",
    "encoder.steps=20",
    "--set",
    "encoder.basis_steps=20",
    "--set",
    "train.steps=2",
    "--set",
    "train.pairs_per_step=2",
    "--set",
    "train.heldout_pairs=2",
    "--set",
    "train.validation_users=1",
    "--set",
    "train.validation_prompts=1",
]
BACKBONES = {
    "sd": lambda d: build_tiny_sd(d),
    "sdxl": lambda d: build_tiny_sd(d, xl=True),
    "cascade": lambda d: build_tiny_cascade(d),
}
RESOLUTION = {"sd": 32, "sdxl": 32, "cascade": 128}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One run root: the data stages are computed once and shared by every backbone (they do not depend on it)."""
    return tmp_path_factory.mktemp("backbones")


# sd in the default suite; cascade and sdxl (about 80 s together on 2 cores) run with `make test-slow`; their
# model classes, layouts and exports have fast tests of their own (tests/models/test_cascade.py, test_sd.py)
HEAVY = {"cascade", "sdxl"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in BACKBONES]
)
def test_backbone_trains_exports_and_generates_through_ppd(name, root, tmp_path):
    model_dir = BACKBONES[name](tmp_path / "model")
    kind = "cascade" if name == "cascade" else "sd"
    sets = [
        *FAST,
        "--set",
        f"backbone.kind={kind}",
        "--set",
        f"backbone.model={model_dir}",
        "--set",
        f"backbone.resolution={RESOLUTION[name]}",
    ]
    run = json.loads(ppd("run", "--root", str(root), "--stages", "train_ppd", *sets, "--json").stdout)
    stages = {s["name"]: s for s in run["stages"]}
    train = stages["train_ppd"]
    assert train["counts"]["steps"] == 2
    meta = read_metadata(Path(train["output_dir"]) / "export")
    assert meta["backbone"]["kind"] == kind and meta["backbone"]["model_id"] == str(model_dir)
    shards = sorted((Path(stages["embed"]["output_dir"]) / "encoder").glob("shard-*.parquet"))
    user = pq.read_table(shards[0], columns=["user_id"]).column("user_id")[0].as_py()  # a user of the run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "images"
    gen = json.loads(
        ppd(
            "generate",
            "--root",
            str(root),
            "--model",
            "ppd",
            "--user",
            str(user),
            "--prompts",
            str(prompts),
            "--steps",
            "2",
            "--out",
            str(out),
            *sets,
            "--json",
        ).stdout
    )
    assert gen["images"] == 2
    assert len(list(out.glob("*.png"))) == 2


def test_a_deterministic_stage_failure_is_said_once_and_not_retried(root, tmp_path):
    """A checkpoint of the wrong kind fails the same way every time: one clear error, no retry, no traceback."""
    sd_dir = build_tiny_sd(tmp_path / "sd")
    sets = [*FAST, "--set", "backbone.kind=cascade", "--set", f"backbone.model={sd_dir}"]
    proc = ppd("run", "--root", str(root), "--stages", "cache_latents", *sets, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "not a Stable Cascade prior checkpoint" in output
    assert "Retry" not in output and "Traceback" not in output

"""The stage abstraction: every stage is one registered object, and a new stage needs nothing but its own
definition and its registration (here: a dummy stage registered the way ppd_core/stages/__init__.py does)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ppd_core import pipeline, stages
from ppd_core.compared import COMPARED, TRAINED
from ppd_core.config import load_config
from ppd_core.manifest import load_manifest
from ppd_core.stage import Stage, StageContext, Summary

SMALL = ["world.num_users=12", "world.mean_pairs_per_user=12"]


def count_train_pairs(ctx: StageContext, out: Path) -> dict:
    """A dummy stage body: reads fewshot's output through the directory it is given."""
    n = pq.read_metadata(ctx.dirs["fewshot"] / "train_pairs.parquet").num_rows
    (out / "count.json").write_text(json.dumps({"train_pairs": n}))
    return {"train_pairs": n}


DUMMY = Stage(
    "dummy",
    "1",
    lambda cfg: ("fewshot",),
    lambda cfg: {"seed": cfg.fewshot.seed},
    count_train_pairs,
    summarize=lambda counts, directory: [Summary("ppd-dummy", rows=[counts])],
)


def test_every_stage_is_registered_once_with_a_version_and_a_body():
    names = [s.name for s in stages.REGISTRY]
    assert len(names) == len(set(names)) and tuple(names) == pipeline.stage_names()
    assert names[:2] == ["synthesize", "ingest"] and names[-1] == "evaluate"
    for s in stages.REGISTRY:
        assert s.version and callable(s.run) and callable(s.upstream) and callable(s.section)
    # every stage shows its progress (a Prefect progress artifact, see tests/test_cli.py): none is silent
    assert [s.name for s in stages.REGISTRY if not s.progress] == []
    # one train stage per trained model of the compared-models table
    assert {s for s in names if s.startswith("train_")} == set(TRAINED)
    assert {m.train_stage for m in COMPARED.values() if m.train_stage} == set(TRAINED)


def test_a_new_stage_runs_from_its_registration_alone(tmp_path, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "dummy", DUMMY)  # the registration line
    cfg = load_config(None, [f"run.root={tmp_path}", *SMALL], environ={})
    assert pipeline.expand(["dummy"], cfg) == ["synthesize", "ingest", "relabel", "fewshot", "dummy"]
    outcomes = pipeline.run_stages(cfg, ["dummy"])
    out = outcomes["dummy"]
    manifest = load_manifest(out.directory)
    assert manifest.stage == "dummy" and manifest.counts["train_pairs"] > 0
    assert json.loads((out.directory / "count.json").read_text()) == manifest.counts
    assert out.directory.parent == tmp_path / "dummy"
    again = pipeline.run_stages(cfg, ["dummy"])["dummy"]
    assert again.reused and again.directory == out.directory  # cached like every stage
    other = load_config(None, [f"run.root={tmp_path}", *SMALL, "fewshot.seed=9"], environ={})
    assert pipeline.plan(
        other, "dummy", {"fewshot": load_manifest(outcomes["fewshot"].directory)}
    ).fingerprint != (manifest.fingerprint)  # its config section is in its fingerprint

    from tasks.stage import task_for

    assert task_for("dummy").name == "dummy"  # the flow's generic task for it


def test_unknown_stage_names_the_registered_ones():
    cfg = load_config(None, [], environ={})
    with pytest.raises(Exception, match="stages are: synthesize, ingest"):
        pipeline.expand(["nope"], cfg)

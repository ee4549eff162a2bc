"""Training through DeepSpeed on CPU: the step's invariants, multi-process runs, exact resume after kill -9."""

import itertools
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ppd_core import pipeline
from ppd_core.config import load_config
from ppd_core.data.fewshot import read_fewshot
from ppd_core.embed.extract import read_embeddings
from ppd_core.models.factory import load_backbone
from ppd_core.train import launch
from ppd_core.train.objectives import OBJECTIVES
from ppd_core.train.stage import train_stage
from ppd_core.train.worker import TrainData

BASE = [
    "world.num_users=16",
    "world.mean_pairs_per_user=30",
    "embed.embedders=[{name: truth, kind: true_preference}, {name: shots, kind: true_attribute_diff}]",
    "embed.default=truth",
    "pretrain.steps=3",
    "pretrain.batch_size=16",
    "train.steps=6",
    "train.pairs_per_step=8",
    "train.checkpoint_every=3",
    "train.validate_every=3",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = load_config(None, [f"run.root={root}", *BASE], environ={})
    outcomes = pipeline.run_stages(cfg, ["cache_latents", "embed"])
    dirs = {k: v.directory for k, v in outcomes.items()}
    return cfg, dirs


def _spec_dirs(dirs):
    return {k: dirs[k] for k in ("cache_latents", "embed", "fewshot", "pretrain")}


def test_first_dpo_loss_is_ln2_and_only_the_adapter_learns(prepared):
    cfg, dirs = prepared
    backbone = load_backbone(cfg.backbone, dirs["pretrain"])
    frozen = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}
    spec = {"dirs": {k: str(v) for k, v in _spec_dirs(dirs).items()}, "embedder": "truth"}
    data = TrainData(spec, OBJECTIVES["ppd"], torch.device("cpu"))
    adapter = backbone.new_adapter(data.embedding_shape, num_tokens=4)
    backbone.install_adapter(adapter)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for step in range(3):
        x0, text, emb = data.batch(list(range(step * 8, step * 8 + 8)))
        g = torch.Generator().manual_seed(step)
        loss, metrics = OBJECTIVES["ppd"].loss(backbone, adapter, x0, text, emb, 100.0, g, 0.0, 1.0)
        if step == 0:  # zero gates: policy == reference
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
            assert metrics["implicit_acc"] == 0.5
        opt.zero_grad()
        loss.backward()
        opt.step()
    after_unet = backbone.denoiser.state_dict()
    assert all(torch.equal(frozen[k], after_unet[k]) for k in frozen)
    changed = {k: not torch.equal(before[k], v) for k, v in adapter.state_dict().items()}
    assert all(changed.values()), [k for k, c in changed.items() if not c]


def _shot_sets(prepared):
    """A train spec on the 'shots' embedder, its embeddings, their row per shot set, and the shot sets."""
    _, dirs = prepared
    spec = {"dirs": {k: str(v) for k, v in _spec_dirs(dirs).items()}, "embedder": "shots"}
    table, emb = read_embeddings(dirs["embed"], "shots")
    row = {sid: i for i, sid in enumerate(table.column("shot_set_id").to_pylist())}
    sets = read_fewshot(
        dirs["fewshot"], "shot_sets", columns=["shot_set_id", "user_id", "pair_ids"]
    ).to_pylist()
    return spec, emb, row, sets


def test_user_mean_conditioning_reads_the_users_other_shot_sets(prepared):
    spec, emb, row, sets = _shot_sets(prepared)
    cpu = torch.device("cpu")
    plain = TrainData(spec, OBJECTIVES["ppd"], cpu)
    mean = TrainData(spec, OBJECTIVES["ppd"], cpu, conditioning="user_mean")
    rows = mean.pairs
    got = mean.condition(rows)
    in_a_set = 0
    for r, g in zip(rows, got, strict=True):
        mine = [s for s in sets if s["user_id"] == r["user_id"]]
        others = [emb[row[s["shot_set_id"]]] for s in mine if r["pair_id"] not in s["pair_ids"]]
        in_a_set += len(others) < len(mine)
        np.testing.assert_allclose(g.numpy(), np.mean(others, axis=0), rtol=1e-5, atol=1e-6)
    assert in_a_set > 0  # the pair's own set is left out for real
    assert not torch.equal(got, plain.condition(rows))  # shot-set conditioning reads one set
    expected = plain.embeddings[[plain.by_set[r["shot_set_id"]] for r in rows]]
    assert torch.equal(plain.condition(rows), expected)
    population = TrainData(spec, OBJECTIVES["dpo"], cpu, conditioning="user_mean")
    assert not population.condition(rows).any()


def test_user_subset_conditioning_reads_a_seeded_subset_of_the_users_other_sets(prepared):
    spec, emb, row, sets = _shot_sets(prepared)
    cpu = torch.device("cpu")
    subset = TrainData(spec, OBJECTIVES["ppd"], cpu, conditioning="user_subset", seed=0)
    rows = subset.pairs
    got = subset.condition(rows)
    sizes = []
    for r, g in zip(rows, got, strict=True):
        chosen = r["shot_set_id"]  # the fewshot stage's set is always in the subset
        others = [
            s["shot_set_id"]
            for s in sets
            if s["user_id"] == r["user_id"]
            and r["pair_id"] not in s["pair_ids"]
            and s["shot_set_id"] != chosen
        ]
        if len(others) > 7:  # which subset it is, by trying them all: 2^7 at most per pair
            continue
        match = [
            len(combo) + 1
            for k in range(len(others) + 1)
            for combo in itertools.combinations(others, k)
            if np.allclose(
                g.numpy(), np.mean([emb[row[c]] for c in (chosen, *combo)], axis=0), rtol=1e-5, atol=1e-6
            )
        ]
        assert match, r["pair_id"]
        sizes.append(match[0])
    assert len(sizes) >= 20  # pairs of users with few sets
    assert min(sizes) == 1 and max(sizes) > 1  # one set, as a new user gives, and means of several
    again = TrainData(spec, OBJECTIVES["ppd"], cpu, conditioning="user_subset", seed=0)
    assert torch.equal(again.condition(rows), got)  # fixed per pair for a seed
    other = TrainData(spec, OBJECTIVES["ppd"], cpu, conditioning="user_subset", seed=1)
    assert not torch.equal(other.condition(rows), got)


def _run(cfg, dirs, out: Path, *overrides, progress=None):
    if overrides:
        cfg = load_config(None, [f"run.root={cfg.run.root}", *BASE, *overrides], environ={})
    out.mkdir(parents=True, exist_ok=True)
    return train_stage(cfg, "ppd", _spec_dirs(dirs), out, progress=progress)


def _adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "export" / "ip_adapter.safetensors"))


@pytest.mark.slow  # ~90 s on 2 cores: a 2-rank DeepSpeed launch (ZeRO-2); the 1-rank launch runs in every trainer test
def test_two_process_deepspeed_run(prepared, tmp_path):
    cfg, dirs = prepared
    reports: list[tuple[int, int]] = []
    summary = _run(
        cfg,
        dirs,
        tmp_path / "two",
        "train.num_gpus=2",
        "train.zero_stage=2",
        progress=lambda *a: reports.append(a),
    )
    assert summary["steps"] == 6 and 0 <= summary["heldout_implicit_acc"] <= 1
    assert reports and reports[-1] == (
        6,
        6,
    )  # progress read from rank 0's metrics log, ending at the last step
    log = (tmp_path / "two" / "launch.log").read_text()
    assert "dist_world_size=2" in log
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # rank 0 only, one per step
    assert (tmp_path / "two" / "checkpoints" / "step-00000006" / "_COMPLETE").is_file()
    assert (tmp_path / "two" / "export" / "README.md").is_file()
    from PIL import Image

    grid = Image.open(tmp_path / "two" / "validation" / "step-00000006.png")
    # base row + up to 4 users (rows) x up to 4 prompts (columns), 16 px images upscaled 4x
    assert grid.size[0] % 64 == 0 and grid.size[1] % 64 == 0 and grid.size[1] >= 2 * 64
    assert list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow  # ~2 min on 2 cores: three launches; checkpoint resume itself is also checked by test_sampler_checkpoint_launch
def test_kill_9_then_resume_equals_an_uninterrupted_run(prepared, tmp_path):
    cfg, dirs = prepared
    straight = tmp_path / "straight"
    _run(cfg, dirs, straight)
    # the same run, killed with SIGKILL (the whole process group) once step 3 is checkpointed
    killed = tmp_path / "killed"
    killed.mkdir()
    import json

    from ppd_core.manifest import atomic_write_json

    spec = json.loads((straight / "train_spec.json").read_text())
    spec["run_dir"] = str(killed)
    atomic_write_json(killed / "train_spec.json", spec)
    cmd = launch.build_command(
        "deepspeed", "ppd_core.train.worker", ["--spec", str(killed / "train_spec.json")]
    )
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    marker = killed / "checkpoints" / "step-00000003" / "_COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (killed / "summary.json").exists()
    _run(cfg, dirs, killed)  # resume: latest
    a, b = _adapter_weights(straight), _adapter_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    export = Path("export") / "ip_adapter.safetensors"  # byte for byte: two processes wrote them
    assert (straight / export).read_bytes() == (killed / export).read_bytes()
    # what the killed attempt logged past its checkpoint was dropped before the resumed steps were logged
    resumed_lines = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert resumed_lines == [1, 2, 3, 4, 5, 6]
    validated = [json.loads(x)["step"] for x in (killed / "validation.jsonl").read_text().splitlines()]
    assert validated == [3, 6]
    # TensorBoard: one event file, the uninterrupted run's (step, tag) history, nothing twice
    (events,) = (killed / "tensorboard").glob("events.out.tfevents.*")
    history = _tensorboard_history(events)
    assert len(history) == len(set(history))
    assert set(history) == set(
        _tensorboard_history(*(straight / "tensorboard").glob("events.out.tfevents.*"))
    )
    assert {step for step, tag in history if tag == "train/loss"} == set(range(1, 7))


def _tensorboard_history(path: Path) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [(e.step, v.tag) for e in EventFileLoader(str(path)).Load() for v in e.summary.value]

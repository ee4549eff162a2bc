"""The `pretrain` stage body on a tiny synthetic world: outputs, learning, determinism, the colour check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ppd_core.config import BackboneConfig, load_config
from ppd_core.data.fewshot import read_pairs
from ppd_core.data.world_render import (
    ATTRIBUTES,
    CAPTIONS,
    caption_content,
    decode_jpeg,
    encode_jpeg,
    render_images,
)
from ppd_core.errors import ConfigError
from ppd_core.models.toy import ToyBackbone
from ppd_core.pipeline import run_stages
from ppd_core.train.pretrain import (
    GRID_SCALE,
    content_accuracy,
    object_colours,
    object_shapes,
    pretrain,
    training_examples,
)

STEPS = 30


def _cfg(root, *extra):
    base = [f"run.root={root}", "world.num_users=8", "world.mean_pairs_per_user=20"]
    return load_config(None, [*base, f"pretrain.steps={STEPS}", "pretrain.batch_size=16", *extra], environ={})


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory):
    return run_stages(_cfg(tmp_path_factory.mktemp("run")), ["ingest"])["ingest"].directory


@pytest.fixture(scope="module")
def trained(ingest_dir, tmp_path_factory):
    cfg = _cfg("unused")
    out = tmp_path_factory.mktemp("pretrain")
    calls = []
    counts = pretrain(
        cfg.pretrain,
        cfg.backbone,
        ingest_dir,
        out,
        progress=lambda step, total: calls.append((step, total)),
        eval_per_caption=2,
        eval_steps=4,
    )
    return out, counts, calls


def test_trains_on_every_distinct_caption_and_image(ingest_dir):
    pairs = read_pairs(ingest_dir)
    expected = set(zip(pairs["winner_uid"].to_pylist(), pairs["caption"].to_pylist(), strict=True)) | set(
        zip(pairs["loser_uid"].to_pylist(), pairs["caption"].to_pylist(), strict=True)
    )
    captions, images = training_examples(ingest_dir, 16)
    assert len(captions) == len(expected) and images.shape == (len(expected), 16, 16, 3)
    assert images.dtype == torch.uint8
    # the pixel checks read every training image's caption back
    accuracy = content_accuracy(images.numpy(), captions)
    assert accuracy["colour_accuracy"] == 1.0 and accuracy["shape_accuracy"] >= 0.98


def test_writes_a_loadable_backbone_and_its_reports(trained):
    out, counts, calls = trained
    assert {p.name for p in out.iterdir()} == {"backbone", "metrics.jsonl", "samples.png", "eval.json"}
    backbone = ToyBackbone.load(out / "backbone")
    assert backbone.identity()["weights_digest"] == counts["weights_digest"]
    assert counts["steps"] == STEPS and calls[-1] == (STEPS, STEPS) and len(calls) == STEPS

    report = json.loads((out / "eval.json").read_text())
    assert report["captions"] == list(CAPTIONS) and report["samples"] == 2 * len(CAPTIONS)
    assert all(0.0 <= report[k] <= 1.0 for k in ("colour_accuracy", "shape_accuracy", "content_accuracy"))
    assert report["train"]["colour_accuracy"] == 1.0 and report["train"]["shape_accuracy"] >= 0.98
    assert counts["colour_accuracy"] == report["colour_accuracy"]
    assert set(report["attributes"]) == set(ATTRIBUTES)
    assert {"train_mean", "train_std", "sample_mean", "sample_std"} <= set(report["attributes"]["size"])
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (2 * 16 * GRID_SCALE, len(CAPTIONS) * 16 * GRID_SCALE)


def test_loss_decreases(trained):
    out, counts, _ = trained
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert all({"loss", "lr", "seconds"} <= set(r) for r in lines)
    assert counts["final_loss"] == lines[-1]["loss"] < min(lines[0]["loss"], counts["first_loss"])
    assert lines[-1]["lr"] < lines[0]["lr"]  # cosine decay after the warmup


def test_is_deterministic(ingest_dir, tmp_path):
    cfg = _cfg("unused", "pretrain.steps=3")
    runs = [
        pretrain(cfg.pretrain, cfg.backbone, ingest_dir, tmp_path / n, eval_per_caption=1, eval_steps=1)
        for n in "ab"
    ]
    assert runs[0]["weights_digest"] == runs[1]["weights_digest"]
    assert runs[0]["final_loss"] == runs[1]["final_loss"]
    assert (tmp_path / "a" / "samples.png").read_bytes() == (tmp_path / "b" / "samples.png").read_bytes()


def test_refuses_other_backbones(ingest_dir, tmp_path):
    cfg = _cfg("unused")
    with pytest.raises(ConfigError, match="toy"):
        pretrain(cfg.pretrain, BackboneConfig(kind="sd", model="x"), ingest_dir, tmp_path)


def test_content_checks_read_colour_and_shape_whatever_the_style():
    rng = np.random.default_rng(0)
    captions = [c for c in CAPTIONS for _ in range(20)]
    styles = np.clip(rng.standard_normal((len(captions), len(ATTRIBUTES))) * 1.5, -3.5, 3.5)
    images = np.stack([decode_jpeg(encode_jpeg(img)) for img in render_images(captions, styles)])
    assert object_colours(images) == [caption_content(c)[0] for c in captions]
    shapes = object_shapes(images)
    assert np.mean([s == caption_content(c)[1] for s, c in zip(shapes, captions, strict=True)]) >= 0.98
    blank = np.full((2, 16, 16, 3), 110, np.uint8)
    assert object_colours(blank) == [None, None] and object_shapes(blank) == [None, None]
    grey = blank.copy()
    grey[:, 5:11, 5:11] = 200  # an object, but with no hue
    assert object_colours(grey) == [None, None]
    assert object_shapes(grey) == ["square", "square"]
    accuracy = content_accuracy(images[:2], ["a blue circle", captions[1]])  # both are red circles
    assert accuracy["colour_accuracy"] == 0.5 and accuracy["colour_accuracy_by_colour"] == {
        "red": 1.0,
        "blue": 0.0,
    }
    assert accuracy["shape_accuracy"] == 1.0 and accuracy["content_accuracy"] == 0.5

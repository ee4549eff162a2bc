"""The few-shot preference encoder: model invariants, training data rules, determinism, resume, shards,
and that it learns what a user's pairs say (held-out pair accuracy above the population model)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from ppd_core import pipeline
from ppd_core.config import load_config
from ppd_core.embed.encoder import EncoderEmbedder
from ppd_core.embed.encoder_model import WEIGHTS_FILE, PreferenceEncoder
from ppd_core.embed.encoder_stage import EncoderInputs, draw_batch, encoder_stage, seen_user_pairs
from ppd_core.embed.extract import read_embeddings, shot_sets_by_id, to_shot_set
from ppd_core.embed.features import FeatureTable
from ppd_core.weights import files_digest

FAST = [
    "world.num_users=24",
    "world.mean_pairs_per_user=30",
    "encoder.steps=60",
    "encoder.basis_steps=60",
    "encoder.validate_every=20",
    "encoder.checkpoint_every=20",
    "embed.embedders=[{name: encoder, kind: encoder}, {name: diff, kind: true_attribute_diff}]",
]


def _cfg(root, *extra):
    return load_config(None, [f"run.root={root}", *FAST, *extra], environ={})


def _weights(directory):
    """The saved encoder's tensors as one digest (the metadata names run-root paths, so bytes differ)."""
    model, _ = PreferenceEncoder.load(directory)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_set_pooling_is_permutation_invariant_and_ignores_padding(pooling):
    torch.manual_seed(0)
    model = PreferenceEncoder(feature_dim=12, z_dim=3, hidden=8, pooling=pooling).eval()
    w, lo = torch.randn(2, 4, 12), torch.randn(2, 4, 12)  # (B, K, D)
    z, _ = model.encode(w, lo)
    perm = torch.tensor([2, 0, 3, 1])
    z_perm, _ = model.encode(w[:, perm], lo[:, perm])
    torch.testing.assert_close(z, z_perm)
    # a 4-pair set padded to 6 with garbage pairs gives the same z when the mask marks them
    pad = torch.randn(2, 2, 12) * 100
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    z_pad, _ = model.encode(torch.cat([w, pad], 1), torch.cat([lo, pad], 1), mask)
    torch.testing.assert_close(z, z_pad)
    assert z.shape == (2, 3)


def test_difference_encoder_reads_only_what_the_two_images_differ_by():
    torch.manual_seed(3)
    model = PreferenceEncoder(feature_dim=6, z_dim=3, hidden=8, pair_encoder="difference").eval()
    w, lo, shared = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 6) * 10
    # a style both images of a pair share moves neither g_w - g_l nor z
    torch.testing.assert_close(model.encode(w + shared, lo + shared)[0], model.encode(w, lo)[0])
    # and z is an affine map of the mean basis difference over the K pairs
    d = (model.g(w) - model.g(lo)).mean(1)  # (B, Z)
    torch.testing.assert_close(model.encode(w, lo)[0], model.head(model.pair(d)))
    other = PreferenceEncoder(feature_dim=6, z_dim=3, hidden=8, pair_encoder="linear").eval()
    assert other.encode(w + shared, lo + shared)[0].sub(other.encode(w, lo)[0]).abs().max() > 1e-3


def test_variational_encoder_returns_mean_and_log_variance():
    model = PreferenceEncoder(feature_dim=6, z_dim=2, hidden=8, variational=True)
    mu, logvar = model.encode(torch.randn(3, 4, 6), torch.randn(3, 4, 6))
    assert mu.shape == logvar.shape == (3, 2)


def test_saved_encoder_reloads_with_the_same_outputs(tmp_path):
    torch.manual_seed(1)
    model = PreferenceEncoder(feature_dim=6, z_dim=2, hidden=8, pooling="attention")
    model.save(tmp_path, {"note": "x"})
    again, extra = PreferenceEncoder.load(tmp_path)
    w, lo = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    torch.testing.assert_close(model.encode(w, lo)[0], again.encode(w, lo)[0])
    assert extra == {"note": "x"} and again.config() == model.config()


@pytest.mark.parametrize("pair_encoder", ["difference", "linear", "mlp"])
@pytest.mark.parametrize("variational", [False, True])
def test_concatenated_members_give_their_z_side_by_side_and_the_sum_of_their_margins(
    pair_encoder, variational
):
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = PreferenceEncoder(10, 3, 8, "mean", variational, pair_encoder)
        for p in m.parameters():
            p.data.normal_()
        # each member standardised its features with its own training users' statistics
        m.feature_mean.copy_(torch.randn(10))
        m.feature_std.copy_(torch.rand(10) + 0.5)
        members.append(m.eval())
    joined = PreferenceEncoder.concatenate(members).eval()
    assert joined.z_dim == 9 and joined.hidden == 24
    w, lo, x1, x2 = torch.randn(5, 4, 10), torch.randn(5, 4, 10), torch.randn(5, 10), torch.randn(5, 10)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[0, 2:] = False
    z, logvar = joined.encode(w, lo, mask)
    parts = [m.encode(w, lo, mask) for m in members]
    torch.testing.assert_close(z, torch.cat([p[0] for p in parts], -1), rtol=1e-4, atol=1e-4)
    if variational:
        torch.testing.assert_close(logvar, torch.cat([p[1] for p in parts], -1), rtol=1e-4, atol=1e-4)
    summed = sum(m.margin(p[0], x1, x2) for m, p in zip(members, parts, strict=True))
    torch.testing.assert_close(joined.margin(z, x1, x2), summed, rtol=1e-4, atol=1e-3)


def test_attention_pooled_members_are_refused():
    with pytest.raises(ValueError, match="mean-pooled"):
        PreferenceEncoder.concatenate([PreferenceEncoder(6, 2, 4, "attention") for _ in range(2)])
    with pytest.raises(Exception, match="pooling: mean"):
        load_config(None, ["encoder.members=2", "encoder.pooling=attention"], environ={})


@pytest.mark.slow  # ~25 s on 2 cores; members are an option (default 1); the default encoder's kill and resume is test_a_killed_encoder_stage_resumes_to_the_same_weights
def test_members_train_under_their_own_directories_and_a_kill_resumes_only_the_unfinished_one(tmp_path):
    cfg = _cfg(tmp_path / "killed", "encoder.members=2")
    ups = pipeline.run_stages(cfg, ["fewshot", "ingest", "tiny_models"])
    inputs = EncoderInputs(ups["fewshot"].directory, ups["ingest"].directory, ups["tiny_models"].directory)
    partial = tmp_path / "partial"
    partial.mkdir()
    seen = []

    class Killed(Exception):
        pass

    def kill_in_second_member(step, total):
        seen.append((step, total))
        if step == 60 + 50:  # member 1, step 50 of 60
            raise Killed

    with pytest.raises(Killed):
        encoder_stage(cfg.encoder, cfg.fewshot.shots, inputs, partial, progress=kill_in_second_member)
    assert seen[-1] == (110, 120) and (partial / "members" / "0" / WEIGHTS_FILE).is_file()
    first = _weights(partial / "members" / "0")
    seen.clear()
    resumed = encoder_stage(
        cfg.encoder, cfg.fewshot.shots, inputs, partial, progress=lambda s, t: seen.append(s)
    )
    assert min(seen) > 100  # member 0 was read back, member 1 went on from its step-40 checkpoint
    assert _weights(partial / "members" / "0") == first and resumed["members"] == 2
    whole = pipeline.run_stages(_cfg(tmp_path / "whole", "encoder.members=2"), ["embed"])
    assert _weights(partial) == _weights(whole["encoder"].directory)
    # member 0 is the single encoder of the same seed; the embedding holds both members' z
    single = pipeline.run_stages(_cfg(tmp_path / "single"), ["encoder"])["encoder"].directory
    assert _weights(whole["encoder"].directory / "members" / "0") == _weights(single)
    _, emb = read_embeddings(whole["embed"].directory, "encoder")
    assert emb.shape[1] == 2 * cfg.encoder.z_dim and np.isfinite(emb).all()


def test_no_target_pair_is_in_its_own_context():
    rng = np.random.default_rng(0)
    offsets = np.cumsum([0, 10, 12])
    users = [
        off + np.arange(2 * n).reshape(n, 2) for off, n in zip(offsets, (5, 6, 30), strict=True)
    ]  # unique rows
    context, targets = draw_batch(rng, users, count=200, shots=4, targets=8)
    assert context.shape == (200, 4, 2) and targets.shape == (200, 8, 2)
    for c, t in zip(context, targets, strict=True):
        assert len(set(c[:, 0])) == 4  # a context holds 4 distinct pairs
        assert not set(c[:, 0]) & set(t[:, 0])
        owner = [u for u in users if c[0, 0] in u[:, 0]][0]
        assert set(t[:, 0]) <= set(owner[:, 0])  # targets are the same user's pairs


def test_training_reads_only_seen_users_outside_evaluation(tmp_path):
    cfg = _cfg(tmp_path)
    fewshot = pipeline.run_stages(cfg, ["fewshot"])["fewshot"].directory
    pairs = seen_user_pairs(fewshot)
    split = {r["user_id"]: r["split"] for r in pq.read_table(fewshot / "users.parquet").to_pylist()}
    eval_ids = set(pq.read_table(fewshot / "eval_pairs.parquet").column("pair_id").to_pylist())
    assert pairs and all(split[u] == "seen" for u in pairs)
    assert not {pid for p in pairs.values() for pid, _, _ in p} & eval_ids


def test_stage_outputs_and_embedding_shards(tmp_path):
    cfg = _cfg(tmp_path)
    out = pipeline.run_stages(cfg, ["embed"])
    enc_dir, embed_dir = out["encoder"].directory, out["embed"].directory
    for name in (WEIGHTS_FILE, "summary.json", "metrics.jsonl", "validation.jsonl"):
        assert (enc_dir / name).is_file()
    assert list((enc_dir / "tensorboard").glob("events.*"))
    steps = [json.loads(x)["step"] for x in (enc_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    features = FeatureTable(enc_dir)
    assert features.dim == 128 * 4 * 4  # tiny VLM width x a 4 x 4 grid
    assert features.source_identity["kind"] == "vlm" and len(features.source_identity["weights_digest"]) == 64
    # embedding shards in the standard schema, one z per shot set
    table, emb = read_embeddings(embed_dir, "encoder")
    schema = pq.read_schema(sorted((embed_dir / "encoder").glob("shard-*.parquet"))[0])
    identity = json.loads(schema.metadata[b"embedder_identity"])
    assert identity["kind"] == "encoder" and identity["weights_digest"] == files_digest(
        [enc_dir / WEIGHTS_FILE]
    )
    assert json.loads(schema.metadata[b"embedding_shape"]) == [cfg.encoder.z_dim]
    assert (
        emb.shape == (out["embed"].manifest.counts["shot_sets"], cfg.encoder.z_dim) and np.isfinite(emb).all()
    )
    # a shot set without cached features (a new user's images) gets the same z from its pixels
    embedder = EncoderEmbedder(enc_dir, out["tiny_models"].directory)
    row = shot_sets_by_id(out["fewshot"].directory, [table.column("shot_set_id")[0].as_py()])[0]
    cached = to_shot_set(row, out["ingest"].directory)
    from dataclasses import replace

    fresh = replace(
        cached, shots=tuple(replace(s, preferred_uid="", dispreferred_uid="") for s in cached.shots)
    )
    np.testing.assert_allclose(embedder.embed([fresh]).embeddings[0].numpy(), emb[0], rtol=1e-4, atol=1e-5)


def test_same_seed_same_weights_and_another_seed_differs(tmp_path):
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = pipeline.run_stages(_cfg(tmp_path / name, f"encoder.seed={seed}"), ["encoder"])["encoder"]
        digests.append(_weights(out.directory))
    assert digests[0] == digests[1] != digests[2]


def test_a_killed_encoder_stage_resumes_to_the_same_weights(tmp_path):
    cfg = _cfg(tmp_path / "killed")
    ups = pipeline.run_stages(cfg, ["fewshot", "ingest", "tiny_models"])
    inputs = EncoderInputs(ups["fewshot"].directory, ups["ingest"].directory, ups["tiny_models"].directory)
    partial = tmp_path / "partial"
    partial.mkdir()

    class Killed(Exception):
        pass

    def kill_at_50(step, total):
        if step == 50:
            raise Killed

    with pytest.raises(Killed):
        encoder_stage(cfg.encoder, cfg.fewshot.shots, inputs, partial, progress=kill_at_50)
    assert sorted(p.name for p in (partial / "checkpoints").glob("*.pt")) == [
        "step-00000020.pt",
        "step-00000040.pt",
    ]
    resumed = encoder_stage(cfg.encoder, cfg.fewshot.shots, inputs, partial)
    assert resumed["resumed_from_step"] == 40 and resumed["features"]["resumed"] > 0
    steps = [json.loads(x)["step"] for x in (partial / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the killed run's lines after step 40 are not repeated
    events = list((partial / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # TensorBoard's history is one file, its steps once each
    history = [(e.step, v.tag) for e in EventFileLoader(str(events[0])).Load() for v in e.summary.value]
    assert len(history) == len(set(history)) and {s for s, tag in history if tag == "encoder/bt_loss"} == set(
        steps
    )
    whole = pipeline.run_stages(_cfg(tmp_path / "whole"), ["encoder"])["encoder"].directory
    assert _weights(partial) == _weights(whole)


def test_the_encoder_learns_held_out_pairs_better_than_the_population_model(tmp_path):
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "world.num_users=64",
            "world.mean_pairs_per_user=50",
            "encoder.steps=600",
            "encoder.basis_steps=600",
            "probe.epochs=2",
            "probe.pair_steps=400",
            "embed.embedders=[{name: encoder, kind: encoder}]",
        ],
        environ={},
    )
    summary = pipeline.run_stages(cfg, ["probe"])["probe"].manifest.counts["summary"]
    encoder = summary["encoder"]["pairs_unseen/encoder_head@4"]
    population = summary["(population)"]["pairs_unseen/bt_population@4"]
    assert encoder > population + 0.05, (encoder, population)
    assert encoder > 0.56


def test_pair_diagnostics_do_not_depend_on_what_ran_before_in_the_process(tmp_path):
    """The probe stage computes after its upstream stages in one process, or alone when they are cached: its
    Bradley-Terry fits (population and per embedder) must give the same figures either way."""
    from ppd_core.config import ProbeConfig
    from ppd_core.embed.pair_probe import pair_diagnostics

    out = pipeline.run_stages(_cfg(tmp_path), ["embed"])
    dirs = {name: out[name].directory for name in ("embed", "fewshot", "encoder")}
    cfg = ProbeConfig(pair_steps=30)
    kinds = {"encoder": "encoder", "diff": "true_attribute_diff"}
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(pair_diagnostics(cfg, dirs["embed"], dirs["fewshot"], dirs["encoder"], kinds))
    assert {r["method"] for r in runs[0]} == {"bt_population", "encoder_head", "bt_probe"}
    assert runs[0] == runs[1]


@pytest.mark.parametrize("pair_encoder", ["difference", "linear"])
@pytest.mark.parametrize("variational", [False, True])
def test_rescaling_z_keeps_every_margin(variational, pair_encoder):
    torch.manual_seed(2)
    model = PreferenceEncoder(
        feature_dim=6, z_dim=3, hidden=8, variational=variational, pair_encoder=pair_encoder
    ).eval()
    w, lo, x1, x2 = (torch.randn(2, 4, 6) for _ in range(4))
    z, logvar = model.encode(w, lo)
    before = model.margin(z[:, None], x1, x2)
    scale = torch.tensor([0.1, 2.0, 5.0])
    model.rescale_z(scale)
    z2, logvar2 = model.encode(w, lo)
    torch.testing.assert_close(z2, z / scale)
    torch.testing.assert_close(model.margin(z2[:, None], x1, x2), before)
    if variational:
        torch.testing.assert_close(logvar2, logvar - 2 * scale.log())

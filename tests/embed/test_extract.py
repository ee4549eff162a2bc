"""The `embed` stage: shard layout on disk, resume after a crash, reuse by shot-set content hash."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ppd_core import pipeline
from ppd_core.config import load_config
from ppd_core.embed.extract import read_embeddings
from ppd_core.schemas import PICKAPIC_V2

EMBEDDERS = "[{name: clip, kind: clip_diff}, {name: truth, kind: true_preference}, {name: bayes, kind: true_posterior}]"


def _cfg(root, *extra):
    base = [
        f"run.root={root}",
        "world.num_users=16",
        "world.mean_pairs_per_user=40",
        f"embed.embedders={EMBEDDERS}",
        "embed.default=clip",
        "embed.shard_sets=8",
        "embed.batch_size=4",
    ]
    return load_config(None, [*base, *extra], environ={})


def _upstream(cfg):
    outcomes = pipeline.run_stages(cfg, ["fewshot", "tiny_models", "synthesize"])
    return {k: v.manifest for k, v in outcomes.items()}


def test_shards_have_the_documented_schema(tmp_path):
    cfg = _cfg(tmp_path)
    out = pipeline.run_stages(cfg, ["embed"])["embed"]
    table, emb = read_embeddings(out.directory, "clip")
    shard = sorted((out.directory / "clip").glob("shard-*.parquet"))[0]
    schema = pq.read_schema(shard)
    assert schema.field("embedding").type.list_size == 64  # tiny open_clip width
    assert json.loads(schema.metadata[b"embedding_shape"]) == [64]
    assert schema.metadata[b"embedding_dtype"] == b"float32"
    identity = json.loads(schema.metadata[b"embedder_identity"])
    assert identity["kind"] == "clip_diff" and len(identity["weights_digest"]) == 64
    assert set(table.column("embedder_digest").to_pylist()) == {identity["weights_digest"]}
    assert emb.shape == (len(table), 64) and np.isfinite(emb).all()
    assert all(len(p) == 4 for p in table.column("pair_ids").to_pylist())
    counts = out.manifest.counts
    assert counts["embedders"]["clip"]["sets"] == counts["shot_sets"] == len(table)
    assert counts["embedders"]["truth"]["shape"] == [5]
    bayes, bayes_emb = read_embeddings(out.directory, "bayes")  # the Bayes limit: standard shards, same sets
    assert bayes.column("shot_set_id").to_pylist() == table.column("shot_set_id").to_pylist()
    assert bayes_emb.shape == (len(table), 5) and np.all(np.linalg.norm(bayes_emb, axis=1) <= 1 + 1e-6)
    bayes_shard = next((out.directory / "bayes").glob("shard-*.parquet"))
    bayes_identity = json.loads(pq.read_schema(bayes_shard).metadata[b"embedder_identity"])
    assert bayes_identity["kind"] == "true_posterior" and bayes_identity["prior_samples"] > 0
    # every shard is listed in the manifest with its digest
    assert {f for f in out.manifest.files if f.startswith("clip/")} == {
        p.relative_to(out.directory).as_posix() for p in (out.directory / "clip").glob("*.parquet")
    }


def test_killed_run_resumes_only_unfinished_shards(tmp_path):
    cfg = _cfg(tmp_path)
    ups = _upstream(cfg)
    manifests = {u: ups[u] for u in pipeline.upstream_of("embed", cfg)}
    plan = pipeline.plan(cfg, "embed", manifests)

    def dies_after_two(fn, items):
        for i, item in enumerate(items):
            if i == 2:
                raise RuntimeError("killed")
            yield fn(item)

    with pytest.raises(RuntimeError, match="killed"):
        pipeline.execute(cfg, plan, manifests, map_fn=lambda fn, items: list(dies_after_two(fn, items)))
    assert not plan.directory.exists()
    outcome = pipeline.execute(cfg, plan, manifests)
    per = outcome.manifest.counts["embedders"]
    assert per["clip"]["shards_resumed"] == 2 and per["truth"]["shards_resumed"] == 0
    assert per["clip"]["computed"] == per["clip"]["sets"] - 16  # two shards of 8 sets were already done
    straight = pipeline.run_stages(_cfg(tmp_path / "straight"), ["embed"])["embed"]
    _, resumed = read_embeddings(outcome.directory, "clip")
    _, expected = read_embeddings(straight.directory, "clip")
    np.testing.assert_allclose(resumed, expected, atol=1e-6)


def test_new_users_compute_only_their_shot_sets(tmp_path):
    world_cfg = _cfg(tmp_path / "world")
    data = pipeline.run_stages(world_cfg, ["synthesize"])["synthesize"].directory / "data"
    table = ds.dataset(data, format="parquet", schema=PICKAPIC_V2).to_table()
    users = sorted(set(table.column("user_id").to_pylist()))
    first, later = users[:10], users[10:]
    for name, keep in (("a", first), ("b", users)):
        (tmp_path / name).mkdir()
        subset = table.filter(pc.is_in(table["user_id"], value_set=pa.array(keep)))
        pq.write_table(subset, tmp_path / name / "part-0.parquet")
    root = tmp_path / "run"
    one = pipeline.run_stages(_cfg(root, f"ingest.source={tmp_path / 'a'}"), ["embed"])["embed"]
    two = pipeline.run_stages(_cfg(root, f"ingest.source={tmp_path / 'b'}"), ["embed"])["embed"]
    assert one.directory != two.directory
    c1, c2 = one.manifest.counts["embedders"]["clip"], two.manifest.counts["embedders"]["clip"]
    assert c1["computed"] == c1["sets"] and c1["reused"] == 0
    assert c2["reused"] == c1["sets"] and c2["computed"] == c2["sets"] - c1["sets"] > 0
    # no synthetic world behind a --source run
    assert {"truth", "bayes"}.isdisjoint(two.manifest.counts["embedders"])
    t1, e1 = read_embeddings(one.directory, "clip")
    t2, e2 = read_embeddings(two.directory, "clip")
    index = {sid: i for i, sid in enumerate(t2.column("shot_set_id").to_pylist())}
    rows = [index[sid] for sid in t1.column("shot_set_id").to_pylist()]
    np.testing.assert_array_equal(e2[rows], e1)
    assert set(t2.column("user_id").to_pylist()) - set(t1.column("user_id").to_pylist()) <= set(later)


def test_probe_table_reports_every_embedder_beside_chance(tmp_path):
    from ppd_core.schemas import PROBE

    cfg = _cfg(tmp_path, "probe.epochs=5")
    probe = pipeline.run_stages(cfg, ["probe"])["probe"]
    table = pq.read_table(probe.directory / "probe.parquet")
    assert table.schema.equals(PROBE, check_metadata=False)
    rows = table.to_pylist()
    assert {r["embedder"] for r in rows} == {"clip", "truth", "bayes"}
    acc = {(r["embedder"], r["task"], r["method"], r["k"]): r["accuracy"] for r in rows}
    for name in ("clip", "truth"):
        assert ("clip", "user_id", "mlp", 1) in acc and (name, "user_id", "chance", 16) in acc
    # the true preference vector identifies the archetype far above chance, even for unseen users
    chance = acc[("truth", "archetype_unseen", "chance", 1)]
    assert acc[("truth", "archetype_unseen", "nearest_centroid", 1)] > 3 * chance
    assert probe.manifest.counts["summary"]["truth"]["user_id/nearest_centroid@1"] > 0.9
    # the true vector reads itself back for new users; clip features of random tiny weights far less
    (truth_read,) = [r for r in rows if r["embedder"] == "truth" and r["task"] == "preference_unseen"]
    assert truth_read["method"] == "ridge" and truth_read["n_classes"] == 0
    assert truth_read["accuracy"] > 0.95
    assert acc[("clip", "preference_unseen", "ridge", 1)] < truth_read["accuracy"]

"""Generation: determinism, file naming that pairs models up, known and brand-new users, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppd_core.errors import InputError, StageError
from ppd_core.evaluate import generate as gen
from ppd_core.pipeline import locate

REPO = Path(__file__).resolve().parents[2]
PPD = str(Path(sys.executable).with_name("ppd"))


@pytest.fixture(scope="module")
def models(small_run):
    cfg, outcomes = small_run
    dirs = {k: v.directory for k, v in outcomes.items()}
    return cfg, dirs, gen.ModelSet.load(cfg, dirs, ["base", "ppd", "dpo"])


def test_fixed_seeds_give_identical_images_whatever_the_batch(models):
    cfg, dirs, ms = models
    user = next(iter(gen.user_conditions(dirs["embed"], cfg.embed.default)))
    cond = gen.known_user(dirs["embed"], cfg.embed.default, user)
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [0, 1, 2]
    one = ms.generate("ppd", prompts, seeds, cond.embedding)
    two = ms.generate("ppd", prompts, seeds, cond.embedding, gen.Settings(batch_size=1))
    assert one.dtype == np.uint8 and one.shape[0] == 3
    np.testing.assert_allclose(one.astype(int), two.astype(int), atol=1)  # batch-size rounding only
    np.testing.assert_array_equal(one, ms.generate("ppd", prompts, seeds, cond.embedding))
    assert not np.array_equal(one[0], one[2])  # the seed matters


def test_seen_users_can_be_conditioned_on_the_mean_of_their_shot_sets(models):
    cfg, dirs, _ = models
    from ppd_core.embed.extract import read_embeddings

    table, emb = read_embeddings(dirs["embed"], cfg.embed.default)
    uids = np.array(table.column("user_id").to_pylist())
    seen = gen.seen_users(dirs["fewshot"])
    user = next(u for u in seen if (uids == u).sum() > 1)  # a seen user with several shot sets
    first = gen.user_conditions(dirs["embed"], cfg.embed.default)
    mean = gen.user_conditions(dirs["embed"], cfg.embed.default, {user})
    sets = emb[uids == user]
    np.testing.assert_array_equal(first[user][1], sets[0])
    np.testing.assert_allclose(mean[user][1], sets.mean(axis=0), rtol=1e-6)
    assert mean[user][0] == first[user][0]  # the judge is still shown the first set
    other = next(u for u in first if u != user)
    np.testing.assert_array_equal(mean[other][1], first[other][1])  # only the listed users are averaged
    assert gen.averaged_users(cfg, dirs["fewshot"]) == seen
    first_cfg = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"seen_embedding": "first"})}
    )
    assert gen.averaged_users(first_cfg, dirs["fewshot"]) == set()
    cond = gen.known_user(dirs["embed"], cfg.embed.default, user, average=True)
    np.testing.assert_allclose(cond.embedding, sets.mean(axis=0), rtol=1e-6)


def test_population_baselines_ignore_the_user(models):
    cfg, dirs, ms = models
    table = gen.user_conditions(dirs["embed"], cfg.embed.default)
    (_, a), (_, b) = list(table.values())[:2]
    prompts, seeds = ["a green triangle"] * 2, [0, 1]
    dpo_a, dpo_b = ms.generate("dpo", prompts, seeds, a), ms.generate("dpo", prompts, seeds, b)
    np.testing.assert_array_equal(dpo_a, dpo_b)  # population DPO ignores the user
    base = ms.generate("base", prompts, seeds)
    assert base.shape == dpo_a.shape


def test_written_outputs_pair_up_by_file_name(models, tmp_path):
    _, _, ms = models
    prompts = ["a red circle", "a blue square"]
    idx, plist, seeds = gen.request_grid(prompts, 2)
    names = {}
    for model in ("base", "dpo"):
        images = ms.generate(model, plist, seeds)
        result = gen.write_images(tmp_path / model, images, idx, seeds, {"model": model, "prompts": prompts})
        assert result["images"] == 4
        names[model] = sorted(p.name for p in (tmp_path / model).glob("*.png"))
        assert json.loads((tmp_path / model / "manifest.json").read_text())["counts"]["images"] == 4
    assert names["base"] == names["dpo"] == ["p000-s0.png", "p000-s1.png", "p001-s0.png", "p001-s1.png"]
    assert not list(tmp_path.glob(".*partial"))


def _user_rows(dirs, n):
    """n Pick-a-Pic v2 rows of one user from the run's synthetic source."""
    src = pa.concat_tables(
        [pq.read_table(f) for f in sorted((dirs["synthesize"] / "data").glob("*.parquet"))]
    )
    rows = [r for r in src.to_pylist() if r["has_label"] and r["label_0"] in (0.0, 1.0) and r["caption"]]
    user = rows[0]["user_id"]
    mine = [r for r in rows if r["user_id"] == user][:n]
    return pa.Table.from_pylist(mine, schema=src.schema)


def test_brand_new_user_from_a_pickapic_parquet(models, tmp_path):
    cfg, dirs, ms = models
    path = tmp_path / "shots.parquet"
    pq.write_table(_user_rows(dirs, 6), path)
    cond = gen.new_user(cfg, dirs, cfg.embed.default, path)
    assert cond.embedding.shape == tuple(ms.embedding_shape("ppd"))
    images = ms.generate("ppd", ["a red circle"], [0], cond.embedding)
    assert images.shape[0] == 1


def test_too_few_pairs_is_a_clear_error(models, tmp_path):
    cfg, dirs, _ = models
    path = tmp_path / "shots.parquet"
    pq.write_table(_user_rows(dirs, 2), path)
    with pytest.raises(InputError, match="usable labelled pair"):
        gen.shots_from_parquet(cfg, path)


def test_locate_refuses_stages_that_never_ran(small_run):
    cfg, _ = small_run
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 7})})
    with pytest.raises(
        StageError,
        match=r"no complete output of train_ppd for this config; make it with: ppd run --root .* --stages train_ppd",
    ):
        locate(other, ["train_ppd"])


def test_cli_generate_writes_images_and_rejects_mistakes(small_run, tmp_path):
    from tests.evaluate.conftest import SMALL_RUN

    cfg, outcomes = small_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    sets = [a for s in SMALL_RUN for a in ("--set", s)]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    user = next(iter(gen.user_conditions(outcomes["embed"].directory, cfg.embed.default)))
    base = [PPD, "generate", "--root", str(cfg.run.root), "--prompts", str(prompts), *sets]
    ok = subprocess.run(
        [
            *base,
            "--model",
            "ppd",
            "--user",
            str(user),
            "--seeds",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["images"] == 4
    bad = subprocess.run(
        [*base, "--model", "teleport", "--user", str(user), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "choose one of" in bad.stderr and "Traceback" not in bad.stderr


def _write(out, n):
    images = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    prompts = [f"prompt {i}" for i in range(n)]
    idx, _, seeds = gen.request_grid(prompts, 1)
    return gen.write_images(out, images, idx, seeds, {"model": "base", "prompts": prompts})


def test_out_dir_replaces_only_an_earlier_output(tmp_path):
    out = tmp_path / "o"
    _write(out, 3)
    assert sorted(p.name for p in out.glob("*.png")) == ["p000-s0.png", "p001-s0.png", "p002-s0.png"]
    _write(out, 1)  # an earlier output of the same command is replaced whole
    assert sorted(p.name for p in out.glob("*.png")) == ["p000-s0.png"]

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("precious\n")
    with pytest.raises(InputError, match="not an earlier `ppd generate` output"):
        _write(precious, 1)
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]

    (out / "notes.txt").write_text("mine\n")  # a file put into an earlier output is not ours to delete
    with pytest.raises(InputError, match="notes.txt"):
        _write(out, 2)
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "p000-s0.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "o"]  # no partial or stale leftovers


def test_cli_generate_refuses_out_dot_holding_its_inputs(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "shots.parquet").write_bytes(b"PAR1 not really")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = ["--root", str(tmp_path / "run"), "--model", "ppd", "--shots", "shots.parquet"]
    proc = subprocess.run(
        [PPD, "generate", *args, "--prompts", "prompts.txt", "--out", "."],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    assert proc.returncode == 2 and "not an earlier `ppd generate` output" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not any(p.name.startswith(".") for p in tmp_path.parent.iterdir() if tmp_path.name in p.name)

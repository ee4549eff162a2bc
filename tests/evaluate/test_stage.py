"""The evaluate stage's on-disk contract and its report, on a small complete run."""

from __future__ import annotations

import json
import subprocess

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ppd_core.errors import InputError
from ppd_core.evaluate.report import pooled
from ppd_core.manifest import is_complete
from ppd_core.schemas import COMPARISONS, WIN_RATES


@pytest.fixture(scope="module")
def evaluated(small_run):
    cfg, outcomes = small_run
    return cfg, outcomes["evaluate"].directory


def test_every_model_answers_the_same_requests(evaluated):
    cfg, out = evaluated
    assert is_complete(out)
    requests = pq.read_table(out / "requests.parquet")
    images = pq.read_table(out / "images.parquet")
    models = sorted(set(images.column("model").to_pylist()))
    assert models == ["base", "dpo", "ppd", "ppd_true", "sft"]
    assert images.num_rows == len(models) * requests.num_rows
    groups = set(requests.column("group").to_pylist())
    assert groups == {"seen", "unseen"}
    per_user = {}
    for r in requests.to_pylist():
        per_user.setdefault(r["user_id"], set()).add(r["prompt"])
    assert all(len(p) <= cfg.evaluate.prompts_per_user for p in per_user.values())


def test_held_out_prompts_never_come_from_the_users_training_pairs(small_run, evaluated):
    _, outcomes = small_run
    _, out = evaluated
    train = pq.read_table(outcomes["fewshot"].directory / "train_pairs.parquet").to_pylist()
    seen_train = {(r["user_id"], r["caption"]) for r in train}
    for r in pq.read_table(out / "requests.parquet").to_pylist():
        if r["group"] == "seen":
            assert (r["user_id"], r["prompt"]) not in seen_train


def test_tables_follow_their_schemas(evaluated):
    _, out = evaluated
    comparisons = pq.read_table(out / "comparisons.parquet")
    assert comparisons.schema.remove(comparisons.schema.get_field_index("judge")) == COMPARISONS
    assert set(comparisons.column("outcome").to_pylist()) <= {-1, 0, 1}
    rates = pq.read_table(out / "win_rates.parquet")
    assert rates.schema.remove(0) == WIN_RATES
    assert set(rates.column("judge").to_pylist()) == {"oracle", "aesthetic", "vlm"}
    for r in rates.to_pylist():
        if r["n_consistent"]:
            assert r["win_rate_low"] <= r["win_rate"] <= r["win_rate_high"]
    agreement = pq.read_table(out / "judge_agreement.parquet").to_pylist()
    assert {a["judge"] for a in agreement} == {"oracle", "aesthetic", "vlm"}
    oracle = next(a for a in agreement if a["judge"] == "oracle")
    assert (
        oracle["agreement"] > 0.6
    )  # the oracle knows each user's true reward; labels are Bradley-Terry noisy


def test_interpolation_covers_every_pair_of_reward_users(evaluated):
    cfg, out = evaluated
    table = pq.read_table(out / "interpolation.parquet").to_pylist()
    pairs = {(r["model"], r["user_a"], r["user_b"]) for r in table}
    assert len(pairs) == 2 * 3  # ppd and ppd_true, 3 pairs of the 3 reward users
    alphas = {r["alpha"] for r in table}
    assert alphas == set(cfg.evaluate.interpolation_alphas)
    checks = pq.read_table(out / "monotonicity.parquet")
    assert checks.num_rows == 2 * 3 * 2


def test_summary_lists_targets_with_values(evaluated):
    _, out = evaluated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary_judge"] == "oracle"
    names = [t["target"] for t in summary["targets"]]
    assert "seen: PPD beats base >= 0.83" in names
    assert "unseen (K shots): PPD reward gain >= 0.7 std" in names
    assert "unseen (K shots): PPD beats population DPO >= 0.70" in names
    assert any("interpolation" in n for n in names)
    pairs = summary["stage1"][
        "pairs_unseen"
    ]  # the probe's held-out pair accuracy, beside the archetype probe
    assert 0.0 <= pairs["default"] <= 1.0 and 0.0 <= pairs["population"] <= 1.0
    assert "pairs_unseen" in summary["stage1"]["embedders"]["encoder"]
    read = summary["stage1"]["preference_unseen"]  # the linear read of new users' true preference
    assert -1.0 <= read["default"] <= 1.0
    assert read["ceiling"] is None  # this small run lists no K-shot ceiling embedder: no comparison to check
    assert not any(n.startswith("unseen: linear read of the true preference") for n in names)
    assert "seen:ppd_vs_base" in summary["headline"]


def test_targets_compare_the_preference_read_with_the_ceiling_as_a_diagnostic():
    import pyarrow as pa

    from ppd_core.evaluate.report import targets

    probe = {"preference_unseen": {"default": 0.33, "ceiling": 0.59}}
    (check,) = [t for t in targets({}, pa.table({}), probe) if t["target"].startswith("unseen: linear read")]
    assert check["value"] == pytest.approx(-0.26) and check["met"] is None  # shown, never a pass or fail


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    from tests.conftest import chromium_binary

    _, out = evaluated
    report = out / "report.html"
    text = report.read_text()
    assert "data:image/png;base64," in text and "<table" in text  # self-contained
    browser = chromium_binary()
    if browser is None:
        pytest.skip("chromium is not installed and apt-get could not install it")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert "Quality targets" in dom and "Headline win rates" in dom and "Stage 1" in dom
    assert dom.count("<img") >= 5  # plots and one grid per model
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_report_is_written_for_people(evaluated):
    """First the headline in sentences and the targets' verdicts; then per-user panels (the user's shot pairs,
    then base / PPD / ceiling images for the same prompts and seed, each with the user's reward); long tables
    folded, with links to their full files that resolve beside the report."""
    import html as html_lib
    import re

    cfg, out = evaluated
    text = (out / "report.html").read_text()
    headline = text[text.index('<section id="headline">') : text.index('<section id="users">')]
    assert "New users, given 4 labelled pairs each: PPD&#x27;s images beat the base model&#x27;s" in headline
    assert "Seen users" in headline and "population DPO" in headline and "true preference vector" in headline
    summary = json.loads((out / "summary.json").read_text())
    verdicts = re.findall(r'<li class="(met|miss|info)">', headline)
    assert len(verdicts) == len(summary["targets"])

    requests = pq.read_table(out / "requests.parquet").to_pylist()
    models = set(pq.read_table(out / "images.parquet").column("model").to_pylist())
    shown = [m for m in ("base", "ppd", "ppd_shots", "ppd_true") if m in models]
    panels = re.findall(
        r'<section class="panel" data-user="(\d+)" data-group="(\w+)">(.*?)</section>', text, re.S
    )
    assert {g for _, g, _ in panels} == {"seen", "unseen"} and len(panels) == 4
    for user, _, body in panels:
        prompts = [r for r in requests if r["user_id"] == int(user) and r["seed"] == 0][:4]
        assert body.count('alt="preferred"') == body.count('alt="dispreferred"') == cfg.fewshot.shots
        assert body.count('class="cell gen"') == len(shown) * len(prompts)
        assert body.count('<span class="r">') == len(shown) * len(prompts)  # the oracle's reward under each

    folded = re.findall(r'<details class="fold"><summary>(.*?)</summary>', text, re.S)
    assert any("Per-user win rates" in f for f in folded) and any(
        "Win rates, all judges" in f for f in folded
    )
    links = [html_lib.unescape(h) for h in re.findall(r'<a href="([^"]+)"', text)]
    assert "tables/win_rates_per_user.csv" in links and "win_rates_per_user.parquet" in links
    for link in links:
        assert (out / link).is_file(), link
    assert text.count("interpolation between reward users") >= 1


@pytest.mark.slow  # ~65 s on 2 cores; the worker-process mapping itself is also checked by tests/rewards/test_relabel.py
def test_generation_and_scoring_shards_over_worker_processes_equal_the_serial_loop(small_run):
    """The evaluate batches as shards, mapped over two spawned worker processes (results in any order):
    images and reward scores equal the one-process loop bit for bit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    import numpy as np

    from ppd_core.data.world_render import world_dir
    from ppd_core.evaluate import judging
    from ppd_core.evaluate.generate import ModelSet, Settings, averaged_users, embedder_for, user_conditions
    from ppd_core.evaluate.stage import ShardWork, generate_sharded, score_sharded
    from ppd_core.rewards.scorers import load_rewards

    cfg, outcomes = small_run
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"batch_size": 3})})
    dirs = {name: Path(o.directory) for name, o in outcomes.items()}
    requests = pq.read_table(outcomes["evaluate"].directory / "requests.parquet")
    users, prompts = requests.column("user_id").to_pylist(), requests.column("prompt").to_pylist()
    seeds = requests.column("seed").to_pylist()
    models = ["base", "ppd", "dpo"]
    table = user_conditions(dirs["embed"], embedder_for(cfg, "ppd"), averaged_users(cfg, dirs["fewshot"]))
    embeddings = {"ppd": np.stack([table[u][1] for u in users])}
    settings = Settings.from_config(cfg)
    serial_models = ModelSet.load(cfg, dirs, models)
    expected = {m: serial_models.generate(m, prompts, seeds, embeddings.get(m), settings) for m in models}
    rewards, _ = load_rewards(cfg.evaluate.rewards, dirs.get("tiny_models"), world_dir(dirs))
    expected_scores = judging.score_all(rewards, expected, prompts, users)

    work = ShardWork(cfg, tuple(dirs.items()), tuple(models))
    batches = []
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:

        def reversed_map(fn, shards):
            batches.append(len(shards))
            return reversed(list(pool.map(fn, shards)))

        images, seconds = generate_sharded(work, models, prompts, seeds, embeddings, settings, reversed_map)
        scores = score_sharded(work, rewards, images, prompts, users, reversed_map)
    assert batches[0] == len(models) * -(-len(prompts) // 3) > len(models)  # several batches per model
    assert set(seconds) == set(models)
    for m in models:
        assert images[m].tobytes() == expected[m].tobytes(), m
    assert set(scores) == set(expected_scores)
    for key, values in expected_scores.items():
        assert scores[key].tobytes() == values.tobytes(), key


EVALUATE_ON = """
import sys
from ppd_core import pipeline
from tests.evaluate.conftest import small_config

print(pipeline.run_stages(small_config(sys.argv[1]), ["evaluate"])["evaluate"].directory)
"""


@pytest.mark.slow  # ~50 s on 2 cores: the whole evaluate stage again in a second process
def test_another_process_computes_identical_tables_from_the_same_inputs(small_run, tmp_path):
    """Evaluate in a second process with another string-hash seed, on the very same upstream outputs (linked
    into a new root): every table equals this process's, row for row with NaN cells in the same places (an
    undefined statistic, e.g. the win rate of a judge without consistent comparisons), and so does every
    number of the summary."""
    import os
    import sys
    from pathlib import Path

    from benchmarks.bench_faults import compare_outputs

    _, outcomes = small_run
    reference = outcomes["evaluate"].directory
    root = tmp_path / "root"
    for stage, outcome in outcomes.items():
        if stage != "evaluate":
            (root / stage).mkdir(parents=True)
            (root / stage / outcome.directory.name).symlink_to(outcome.directory)
    repo = Path(__file__).resolve().parents[2]
    mine = os.environ.get("PYTHONHASHSEED")  # unset: this process's seed is random
    env = {
        **os.environ,
        "PYTHONHASHSEED": "2" if mine == "1" else "1",
        "PYTHONPATH": os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", EVALUATE_ON, str(root)],
        capture_output=True, text=True, cwd=repo, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = Path(proc.stdout.strip().splitlines()[-1])
    assert output == root / "evaluate" / reference.name  # computed anew here, under the same fingerprint
    assert compare_outputs(reference, output) == []
    summaries = [json.loads((d / "summary.json").read_text()) for d in (reference, output)]
    for summary in summaries:
        summary.pop("created_at")
    assert json.dumps(summaries[0], sort_keys=True) == json.dumps(summaries[1], sort_keys=True)


def test_runs_of_one_world_pool_into_one_verdict(evaluated, tmp_path):
    """Several training runs of the same users are judged together: their rows are concatenated, each user one
    bootstrap cluster; one run alone reproduces its own summary, and runs of other users are refused."""
    cfg, out = evaluated
    summary = json.loads((out / "summary.json").read_text())
    alone = pooled(cfg, [out])
    assert alone["headline"] == summary["headline"]
    assert alone["stage1"] == summary["stage1"]
    assert [t for t in alone["targets"] if not t["target"].startswith("interpolation")] == [
        t for t in summary["targets"] if not t["target"].startswith("interpolation")
    ]

    # a second "run" in which every judged outcome of every comparison is reversed
    comparisons = pq.read_table(out / "comparisons.parquet")
    outcome = comparisons["outcome"]
    flipped = pc.if_else(pc.equal(outcome, -1), -1, pc.subtract(1, outcome)).cast(outcome.type)
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(
        comparisons.set_column(comparisons.schema.get_field_index("outcome"), "outcome", flipped),
        other / "comparisons.parquet",
    )
    (other / "summary.json").write_text(json.dumps(summary))
    both = pooled(cfg, [out, other])
    assert both["runs"] == 2
    for key, row in both["headline"].items():
        assert row["n"] == 2 * summary["headline"][key]["n"]
        assert row["n_users"] == summary["headline"][key]["n_users"]  # users, not runs, are the clusters
        if summary["headline"][key]["inconsistency_rate"] < 1:
            assert row["win_rate"] == pytest.approx(0.5)

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    users = comparisons["user_id"].to_pylist()
    renamed = pa.array([u + 10_000 for u in users], comparisons.schema.field("user_id").type)
    pq.write_table(comparisons.set_column(0, "user_id", renamed), stranger / "comparisons.parquet")
    (stranger / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="different users"):
        pooled(cfg, [out, stranger])

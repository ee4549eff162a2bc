"""The `ppd` command line through its installed entry point, and the cached Prefect data flow."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.bench_faults import kill_group, launched_by, reap, survivors, tensorboard_history
from ppd_core import pipeline
from ppd_core.config import reference_markdown

REPO = Path(__file__).resolve().parents[1]
PPD = str(Path(sys.executable).parent / "ppd")
SMALL = ["--set", "world.num_users=24", "--set", "world.mean_pairs_per_user=30"]
SMALL += ["--set", "encoder.steps=100", "--set", "encoder.basis_steps=200"]


def ppd_env(env=None) -> dict[str, str]:
    full_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    full_env.pop("PREFECT_API_URL", None)
    return full_env


def ppd(*args, check=True, env=None):
    proc = subprocess.run(
        [PPD, *args], capture_output=True, text=True, cwd=REPO, env=ppd_env(env), timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ppd {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc


def run_json(*args):
    return {s["name"]: s for s in json.loads(ppd("run", *args, "--json").stdout)["stages"]}


_READ_PROGRESS = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

async def main():
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    print(json.dumps([{"description": a.description, "data": a.data} for a in found]))

asyncio.run(main())
"""


def progress_artifacts(root: Path) -> list[dict]:
    """The progress artifacts recorded in a run root's Prefect database (description, percentage)."""
    env = ppd_env({"PREFECT_HOME": str(root / ".prefect")})
    proc = subprocess.run(
        [sys.executable, "-c", _READ_PROGRESS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [[], ["run"], ["config"], ["config", "show"], ["config", "reference"]])
def test_help_for_every_command(command):
    proc = ppd(*command, "--help")
    assert "Usage" in proc.stdout and "--help" in proc.stdout


def test_run_help_lists_contract_options():
    text = ppd("run", "--help").stdout
    for option in ("--config", "--root", "--source", "--stages", "--set", "--json"):
        assert option in text


def test_config_show_resolves_overrides():
    text = ppd("config", "show", "--set", "fewshot.seed=7", env={"PPD_WORLD__NUM_USERS": "33"}).stdout
    assert "seed: 7" in text and "num_users: 33" in text
    shown = json.loads(ppd("config", "show", "--json", "--config", "configs/pickapic_cascade.yaml").stdout)
    assert shown["fewshot"]["unseen_fraction"] == 0.1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["config", "show", "--set", "fewshot.sheds=1"], "fewshot.sheds: unknown key"),
        (["config", "show", "--set", "world.num_users=lots"], "world.num_users"),
        (["config", "show", "--config", "nope.yaml"], "config file not found"),
        (["run", "--stages", "ingest,teleport"], "unknown stage"),
        (["run", "--source", "/nonexistent/pickapic", "--stages", "ingest"], "/nonexistent/pickapic"),
        # rich markup is off: brackets in a user's path are printed as given, never parsed as tags
        (
            ["run", "--source", "/nonexistent/pick[/x]a[us]pic", "--stages", "ingest"],
            "/nonexistent/pick[/x]a[us]pic",
        ),
    ],
)
def test_user_mistakes_are_clear_errors(args, needle, tmp_path):
    proc = ppd(*args, "--root", str(tmp_path), check=False) if args[0] == "run" else ppd(*args, check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_readme_config_table_is_current():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme
    first = [line for line in readme.splitlines() if line.startswith("make ")][:2]
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]


# about 80 s on 2 cores (three CLI runs through probe); caching and recomputation stay covered by default in
# test_two_runs_on_one_root_compute_each_stage_once, tests/test_manifest.py and tests/ops/test_status.py
@pytest.mark.slow
def test_pipeline_flow_caches_and_recomputes_only_what_changed(tmp_path):
    root = str(tmp_path / "run")
    first = run_json("--root", root, *SMALL, "--stages", "probe")
    assert list(first) == [
        "synthesize",
        "ingest",
        "tiny_models",
        "relabel",
        "fewshot",
        "encoder",
        "embed",
        "probe",
    ]
    assert not any(s["cached"] for s in first.values())
    for s in first.values():
        assert Path(s["output_dir"], "manifest.json").is_file()
        assert Path(s["output_dir"]).parent == Path(root, s["name"])
    ingest = first["ingest"]["counts"]
    assert ingest["input_rows"] == ingest["kept_rows"] + ingest["quarantined"] > 0
    # every computed stage showed its progress as a Prefect artifact, ending at 100%
    finished = {a["description"] for a in progress_artifacts(Path(root)) if a["data"] == 100}
    assert {pipeline.stage(name).progress for name in first} <= finished

    second = run_json("--root", root, *SMALL, "--stages", "probe")
    assert all(s["cached"] for s in second.values())
    assert {k: v["output_dir"] for k, v in second.items()} == {k: v["output_dir"] for k, v in first.items()}

    shutil.rmtree(first["fewshot"]["output_dir"])
    third = run_json("--root", root, *SMALL, "--stages", "probe")
    assert [k for k, v in third.items() if not v["cached"]] == ["fewshot"]
    assert third["fewshot"]["counts"] == first["fewshot"]["counts"]

    # a changed fewshot seed recomputes fewshot only, into a new directory
    fourth = run_json("--root", root, *SMALL, "--set", "fewshot.seed=1", "--stages", "fewshot")
    assert [k for k, v in fourth.items() if not v["cached"]] == ["fewshot"]
    assert fourth["fewshot"]["output_dir"] != first["fewshot"]["output_dir"]


def test_two_runs_on_one_root_compute_each_stage_once(tmp_path):
    """Two ``ppd run`` started together on a new root: the Prefect database is created once (no migration
    crash), each stage is computed by one of them and reused by the other, and both succeed."""
    root = tmp_path / "run"
    cmd = [PPD, "run", "--root", str(root), *SMALL, "--stages", "fewshot", "--json"]
    procs = []
    for delay in (0.0, 0.5):
        time.sleep(delay)
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ppd_env()
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "Traceback" not in stderr, stderr[-4000:]
    reports = [{s["name"]: s for s in json.loads(stdout)["stages"]} for stdout, _ in outputs]
    assert list(reports[0]) == list(reports[1]) == ["synthesize", "ingest", "relabel", "fewshot"]
    for stage in reports[0]:
        assert sorted(r[stage]["cached"] for r in reports) == [False, True], stage  # computed exactly once
        assert reports[0][stage]["output_dir"] == reports[1][stage]["output_dir"]
    hidden = [p.name for p in root.glob("*/.*") if not p.name.endswith(".lock")]
    assert not hidden  # no partial or stale directory left


def test_real_pickapic_source_ingests_and_caches(tmp_path):
    from ppd_core.config import load_config
    from ppd_core.pipeline import run_stages

    cfg = load_config(None, ["world.num_users=12", f"run.root={tmp_path / 'world'}"], environ={})
    source = run_stages(cfg, ["synthesize"])["synthesize"].directory / "data"
    copy = tmp_path / "pickapic"
    shutil.copytree(source, copy)
    root = str(tmp_path / "run")
    first = run_json("--root", root, "--source", str(copy), "--stages", "ingest,fewshot")
    assert list(first) == ["ingest", "relabel", "fewshot"] and not any(s["cached"] for s in first.values())
    skipped = first["relabel"]["counts"]["rewards_skipped"]  # the default attribute rewards need the world
    assert sorted(skipped) == ["brightness", "saturation", "size"] and first["relabel"]["counts"]["rows"] == 0
    assert (
        first["ingest"]["counts"]["input_rows"]
        == first["ingest"]["counts"]["kept_rows"] + first["ingest"]["counts"]["quarantined"]
    )
    second = run_json("--root", root, "--source", str(copy), "--stages", "ingest,fewshot")
    assert all(s["cached"] for s in second.values())


TRAIN = [
    *("--set", "world.num_users=16", "--set", "world.mean_pairs_per_user=30"),
    *("--set", "embed.embedders=[{name: truth, kind: true_preference}]", "--set", "embed.default=truth"),
    *("--set", "pretrain.steps=3", "--set", "pretrain.batch_size=16", "--set", "train.steps=12"),
    *(
        "--set",
        "train.pairs_per_step=8",
        "--set",
        "train.checkpoint_every=3",
        "--set",
        "train.validate_every=3",
    ),
    *("--set", "train.log_every=1", "--stages", "train_ppd", "--json"),
]


@pytest.mark.slow  # about 3 minutes on 2 cores: the data stages, then training twice
def test_kill_9_of_ppd_ends_training_and_the_rerun_logs_each_step_once(tmp_path):
    """``kill -9`` of the ppd process group mid-training: the DeepSpeed launcher and ranks (their own session)
    end too; the rerun resumes from the last checkpoint and commits logs with every step once."""
    root = tmp_path / "run"
    cmd = [PPD, "run", "--root", str(root), *TRAIN]
    log = tmp_path / "killed-ppd.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, env=ppd_env(), start_new_session=True
        )
    deadline = time.time() + 480
    while not list(root.glob("train_ppd/.*.partial/checkpoints/step-00000003/_COMPLETE")):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"training did not reach its first checkpoint:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    assert launched_by(proc.pid)  # the rank, in a session of its own; its environment names this ppd
    seen = kill_group(proc)  # kill -9 of the process group
    left, _ = survivors(proc.pid, seen, wait_s=30)
    reap(seen)
    assert not left, f"training outlived the killed ppd: {left}"

    rerun = ppd("run", "--root", str(root), *TRAIN)
    train = {s["name"]: s for s in json.loads(rerun.stdout)["stages"]}["train_ppd"]
    out = Path(train["output_dir"])
    assert not train["cached"] and (out / "manifest.json").is_file()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    validated = [json.loads(x)["step"] for x in (out / "validation.jsonl").read_text().splitlines()]
    assert validated == [3, 6, 9, 12]
    names, history = tensorboard_history(out / "tensorboard")
    assert len(names) == 1 and len(history) == len(set(history))  # one event file, each (tag, step) once
    assert {step for tag, step in history if tag == "train/loss"} == set(range(1, 13))


@pytest.mark.slow  # about 4 minutes on 2 cores: the data stages, then two train stages in one launch
def test_due_train_stages_train_in_one_launch_each_recorded(tmp_path):
    """``ppd run`` of two due train stages: one task (one DeepSpeed launch) builds both, each still has its
    own output, report line, progress artifact and ``ppd status`` row; a complete one is never retrained."""
    root = tmp_path / "run"
    setup = [*TRAIN[:-3], "--set", "train.steps=4", "--set", "train.checkpoint_every=2"]
    args = ["--root", str(root), *setup, "--stages", "train_ppd,train_dpo"]
    first = run_json(*args)
    assert first["train_ppd"]["joint_with"] == ["train_dpo"] and first["train_dpo"]["joint_with"] == [
        "train_ppd"
    ]
    exports = {}
    for name in ("train_ppd", "train_dpo"):
        out = Path(first[name]["output_dir"])
        assert not first[name]["cached"] and (out / "manifest.json").is_file()
        assert first[name]["counts"]["steps"] == 4
        spec = json.loads((out / "train_spec.json").read_text())
        assert [r["trainer"] for r in spec["runs"]] == ["ppd", "dpo"]  # the one launch trained both
        exports[name] = (out / "export" / "ip_adapter.safetensors").read_bytes()
    assert exports["train_ppd"] != exports["train_dpo"]
    finished = {a["description"] for a in progress_artifacts(root) if a["data"] == 100}
    assert {"train_ppd steps", "train_dpo steps"} <= finished
    status = {s["name"]: s for s in json.loads(ppd("status", "--root", str(root), "--json").stdout)["stages"]}
    for name in ("train_ppd", "train_dpo"):
        assert (
            status[name]["output_dir"] == first[name]["output_dir"] and status[name]["counts"]["steps"] == 4
        )

    second = run_json(*args)
    assert all(s["cached"] for s in second.values()) and not any("joint_with" in s for s in second.values())

    # one output gone: only it is trained again (alone), to the same bytes; the other stays cached
    shutil.rmtree(first["train_dpo"]["output_dir"])
    third = run_json(*args)
    assert third["train_ppd"]["cached"] and not third["train_dpo"]["cached"]
    assert "joint_with" not in third["train_dpo"]
    out = Path(third["train_dpo"]["output_dir"])
    assert out == Path(first["train_dpo"]["output_dir"])
    assert "runs" not in json.loads((out / "train_spec.json").read_text())  # a launch of its own
    assert (out / "export" / "ip_adapter.safetensors").read_bytes() == exports["train_dpo"]


def test_config_errors_name_the_source_of_the_value():
    proc = ppd("config", "show", "--set", "world.num_users=lots", check=False)
    assert proc.returncode == 2 and "(from --set world.num_users)" in proc.stderr
    assert "toy.yaml" not in proc.stderr and "Traceback" not in proc.stderr
    proc = ppd("config", "show", check=False, env={"PPD_WORLD__NUM_USERS": "lots"})
    assert proc.returncode == 2 and "(from PPD_WORLD__NUM_USERS)" in proc.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ('embed.embedders=[{name: "../../../x", kind: clip_diff}]', "embed.embedders.0.name"),
        ('evaluate.rewards=[{name: "a/b", kind: oracle}]', "evaluate.rewards.0.name"),
        ('evaluate.judges=[{name: "..", kind: oracle}]', "evaluate.judges.0.name"),
    ],
)
def test_names_that_would_escape_the_run_root_are_refused(override, key):
    proc = ppd("config", "show", "--set", override, check=False)
    assert proc.returncode == 2 and f"{key}: Value error" in proc.stderr and "not a safe name" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "command", [["run", "--stages", "synthesize"], ["status"], ["ui", "--stop"], ["generate"]]
)
def test_root_that_is_a_file_is_a_one_line_error(command, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine\n")
    extra = ["--model", "base", "--prompts", str(afile), "--out", str(tmp_path / "o")]
    proc = ppd(*command, "--root", str(afile), *(extra if command == ["generate"] else []), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"run root {afile} is a file, not a directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and afile.read_text() == "mine\n"


def test_generate_on_a_root_without_outputs_names_every_missing_stage_at_once(tmp_path):
    """A root lacking upstream stages names every missing stage at once, with the command that makes them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = ppd(
        "generate",
        "--root",
        str(empty),
        "--model",
        "base",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o2"),
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    named = message.split("no complete output of ", 1)[1].split(" for this config")[0].split(", ")
    assert named[:2] == ["synthesize", "ingest"] and {"fewshot", "embed", "pretrain"} <= set(named)
    assert f"ppd run --root {empty} --stages" in message


# about 85 s on 2 cores (a run through embed and pretrain, then generate); the missing-stage message stays in the
# default suite above, and what a run records in run_config.yaml is also checked by tests/ops/test_backfill.py
@pytest.mark.slow
def test_a_run_root_remembers_its_config_for_later_commands(tmp_path):
    """After `ppd run --set ...`, `ppd generate` on the root needs none of those settings again, and a run
    with other settings says what differs."""
    root = tmp_path / "root"
    sets = [*SMALL, "--set", "pretrain.steps=5"]
    ppd("run", "--root", str(root), "--stages", "embed,pretrain", *sets)
    recorded = yaml.safe_load((root / "run_config.yaml").read_text())
    assert recorded["world"]["num_users"] == 24 and recorded["pretrain"]["steps"] == 5
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "images"
    gen = ppd(
        "generate",
        "--root",
        str(root),
        "--model",
        "base",
        "--prompts",
        str(prompts),
        "--steps",
        "2",
        "--out",
        str(out),
        "--json",
    )  # no --set: the root's recorded config
    assert json.loads(gen.stdout)["images"] == 1

    changed = ppd("run", "--root", str(root), "--stages", "fewshot", *sets, "--set", "fewshot.seed=3")
    assert "last run with another config (differs in fewshot.seed)" in " ".join(changed.stderr.split())

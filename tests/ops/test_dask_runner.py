"""`run.task_runner: dask`: a stage's shards mapped over a local Dask cluster of worker processes (through
prefect-dask), against a real Prefect server. The embed shards equal the thread runner's bit for bit; a
worker killed while shards remain leaves a correct, complete output; each worker is pinned to its own
device."""

from __future__ import annotations

import shutil
import threading
import time

import psutil
import pytest

from ppd_core.config import load_config
from ppd_core.devices import assign_devices, device_for_worker, threads_per_worker
from ppd_core.embed.extract import read_embeddings
from ppd_core.layout import RunLayout
from ppd_core.manifest import load_manifest

pytest.importorskip("prefect_dask")

EMBEDDERS = "[{name: clip, kind: clip_diff}]"


def _cfg(root, runner: str, *extra):
    base = [
        f"run.root={root}",
        f"run.task_runner={runner}",
        "world.num_users=16",
        "world.mean_pairs_per_user=40",
        f"embed.embedders={EMBEDDERS}",
        "embed.default=clip",
        "embed.shard_sets=4",
        "embed.batch_size=4",
        "embed.device=auto",
        "embed.shard_workers=2",
    ]
    return load_config(None, [*base, *extra], environ={})


@pytest.fixture
def pipeline_flow(prefect_server, tmp_path):
    """`flows.pipeline.pipeline_flow` reporting to the session's server, results under the test's root."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import pipeline_flow

    settings = {PREFECT_API_URL: prefect_server, PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}
    with temporary_settings(settings):
        yield pipeline_flow


def _embed(report: list[dict]) -> dict:
    return next(s for s in report if s["name"] == "embed")


def _dask_workers() -> list[psutil.Process]:
    """The worker processes of this process's local Dask cluster (its nannies spawn them here)."""
    found = []
    for p in psutil.Process().children():
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow  # ~90 s on 2 cores: an embed run on threads, then the same on 2 dask workers
def test_dask_workers_compute_the_thread_runners_shards_bit_for_bit(pipeline_flow, tmp_path):
    root = tmp_path / "run"
    threads = _embed(pipeline_flow(_cfg(root, "threads"), ["embed"]))
    expected = load_manifest(threads["output_dir"])
    table_t, emb_t = read_embeddings(threads["output_dir"], "clip")
    shutil.rmtree(threads["output_dir"])  # the same fingerprint (volatile keys): recomputed, nothing reused

    dask = _embed(pipeline_flow(_cfg(root, "dask"), ["embed"]))
    assert dask["output_dir"] == threads["output_dir"] and not dask["cached"]
    got = load_manifest(dask["output_dir"])
    assert got.counts["sets_computed"] == got.counts["shot_sets"] == len(table_t) > 8  # several shards
    assert got.counts["embedders"]["clip"]["shards"] == expected.counts["embedders"]["clip"]["shards"] > 2
    assert {k: v.sha256 for k, v in got.files.items()} == {k: v.sha256 for k, v in expected.files.items()}
    table_d, emb_d = read_embeddings(dask["output_dir"], "clip")
    assert table_d.equals(table_t) and emb_d.tobytes() == emb_t.tobytes()


@pytest.mark.slow  # ~3 min on 2 busy cores: a threads run, then a dask run that loses a worker
def test_a_worker_killed_mid_stage_leaves_a_correct_output(pipeline_flow, tmp_path):
    root = tmp_path / "run"
    reference = _embed(pipeline_flow(_cfg(root, "threads", "embed.shard_sets=6"), ["embed"]))
    _, expected = read_embeddings(reference["output_dir"], "clip")
    shutil.rmtree(reference["output_dir"])  # recomputed below, nothing reused
    cfg = _cfg(root, "dask", "embed.shard_sets=6")
    shards = RunLayout(root).stage_root("embed")
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_worker_mid_stage() -> None:  # the flow runs in this test's thread (its Prefect settings)
        while not stop.is_set():
            done = list(shards.glob(".*.partial/clip/shard-*.parquet")) if shards.is_dir() else []
            workers = _dask_workers()
            if done and len(workers) >= 2:  # shards are being written and more remain: the workers are busy
                workers[0].kill()
                killed.append(workers[0].pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_mid_stage, daemon=True)
    killer.start()
    try:
        report = pipeline_flow(cfg, ["embed"])
    finally:
        stop.set()
        killer.join(10)
    assert killed, "the stage ended before a worker could be killed"
    killed = killed[0]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    embed = _embed(report)
    manifest = load_manifest(embed["output_dir"])
    assert manifest.counts["shot_sets"] == manifest.counts["embedders"]["clip"]["sets"]
    assert not [f for f in manifest.files if f.rsplit("/", 1)[-1].startswith(".")]  # no temporary committed
    _, got = read_embeddings(embed["output_dir"], "clip")
    assert got.tobytes() == expected.tobytes()


def test_device_assignment_gives_each_worker_its_own_device():
    gpus = ["cuda:0", "cuda:1", "cuda:2"]
    assert assign_devices(3, gpus) == gpus
    assert assign_devices(4, gpus[:2]) == [
        "cuda:0",
        "cuda:1",
        "cuda:0",
        "cuda:1",
    ]  # more workers: round-robin
    assert assign_devices(2, ["cpu"]) == ["cpu", "cpu"] and device_for_worker(0, []) == "cpu"
    assert threads_per_worker(2, cpus=16) == 8 and threads_per_worker(4, cpus=2) == 1
    with pytest.raises(ValueError):
        device_for_worker(-1, gpus)


def _report_device(shard: int) -> tuple[str, str | None, int]:
    """A shard that reports where it ran: (worker name, the device this process is pinned to, its pid)."""
    import os

    from distributed import get_worker

    from ppd_core.devices import pinned_device

    time.sleep(0.3)  # long enough that both workers take shards
    return str(get_worker().name), pinned_device(), os.getpid()


def test_local_dask_workers_are_pinned_one_device_each(prefect_server):
    """Through the stage's own mapper, with a fake list of two GPUs: worker i runs on cuda:i."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.stage import _shard_mapper

    run = load_config(None, ["run.task_runner=dask"], environ={}).run

    @flow
    def fan_out() -> list:
        return list(_shard_mapper(2, run, visible=("cuda:0", "cuda:1"))(_report_device, list(range(8))))

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        results = fan_out()
    by_worker = {name: (device, pid) for name, device, pid in results}
    assert len(results) == 8 and set(by_worker) == {"0", "1"}
    assert {name: device for name, (device, _) in by_worker.items()} == {"0": "cuda:0", "1": "cuda:1"}
    assert len({pid for _, (_, pid) in by_worker.items()}) == 2  # two processes


EVALUATE_TABLES = (
    "requests",
    "images",
    "rewards",
    "comparisons",
    "win_rates",
    "judge_agreement",
    "interpolation",
)


@pytest.mark.slow  # ~6 min on 2 cores: a small run through evaluate, then evaluate again over 2 dask workers
def test_dask_workers_compute_the_thread_runners_evaluation(pipeline_flow, tmp_path):
    """Evaluate's generation and scoring batches mapped over worker processes give the thread runner's tables."""
    import pyarrow.parquet as pq

    from benchmarks.bench_faults import tables_equal
    from tests.evaluate.conftest import SMALL_RUN

    root = tmp_path / "run"

    def cfg(runner: str):
        return load_config(None, [f"run.root={root}", f"run.task_runner={runner}", *SMALL_RUN], environ={})

    def evaluate(report: list[dict]) -> dict:
        return next(s for s in report if s["name"] == "evaluate")

    threads = evaluate(pipeline_flow(cfg("threads"), ["evaluate"]))
    out = threads["output_dir"]
    expected = {name: pq.read_table(f"{out}/{name}.parquet") for name in EVALUATE_TABLES}
    assert expected["images"].num_rows > 4  # several generation batches
    shutil.rmtree(out)  # the same fingerprint (volatile keys): recomputed, nothing reused

    dask = evaluate(pipeline_flow(cfg("dask"), ["evaluate"]))
    assert dask["output_dir"] == out and not dask["cached"]
    for name, table in expected.items():
        assert tables_equal(pq.read_table(f"{out}/{name}.parquet"), table), name  # NaN where undefined

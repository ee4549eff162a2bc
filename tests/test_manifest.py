"""Atomic stage directories: manifest written last, completeness, reuse and recomputation."""

import os
import subprocess
import sys
import threading
import time

import pytest

from ppd_core import locks
from ppd_core.layout import RunLayout
from ppd_core.manifest import MANIFEST_NAME, is_complete, load_manifest, run_stage, verify


def _writer(calls):
    def build(out):
        calls.append(out)
        (out / "sub").mkdir()
        (out / "a.txt").write_text("hello")
        (out / "sub" / "b.bin").write_bytes(b"\x00" * 10)
        return {"rows": 2}

    return build


def _run(layout, calls, fp="f1"):
    return run_stage(
        layout, "demo", fp, _writer(calls), code_version="1", config={"k": 1}, upstream={"up": "d"}
    )


def test_commit_writes_manifest_and_reuses(tmp_path):
    layout, calls = RunLayout(tmp_path), []
    first = _run(layout, calls)
    assert not first.reused and len(calls) == 1
    assert first.directory == tmp_path / "demo" / "f1"
    m = load_manifest(first.directory)
    assert set(m.files) == {"a.txt", "sub/b.bin"}
    assert m.files["a.txt"].size == 5 and m.counts == {"rows": 2} and m.upstream == {"up": "d"}
    assert not layout.partial_dir("demo", "f1").exists()
    second = _run(layout, calls)
    assert second.reused and len(calls) == 1 and second.manifest.digest == first.manifest.digest


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: (d / "a.txt").unlink(),
        lambda d: (d / "a.txt").write_text("hello world"),
        lambda d: (d / "a.txt").write_text("HELLO"),  # same size, new content
        lambda d: (d / MANIFEST_NAME).unlink(),
        lambda d: (d / MANIFEST_NAME).write_text("{not json"),
    ],
)
def test_tampered_directory_is_recomputed(tmp_path, tamper):
    layout, calls = RunLayout(tmp_path), []
    out = _run(layout, calls).directory
    tamper(out)
    assert not is_complete(out) and verify(out)
    again = _run(layout, calls)
    assert not again.reused and len(calls) == 2
    assert is_complete(again.directory) and (again.directory / "a.txt").read_text() == "hello"
    # no stale or partial directory is left; the output's lock file stays (see ppd_core.locks)
    hidden = [p.name for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")]
    assert hidden == [layout.lock_path("demo", "f1").name]


def test_touched_but_unchanged_file_still_complete(tmp_path):
    layout, calls = RunLayout(tmp_path), []
    out = _run(layout, calls).directory
    os.utime(out / "a.txt", ns=(1, 1))  # mtime differs, content equal -> re-hash says fine
    assert is_complete(out)


def test_killed_build_leaves_nothing_complete(tmp_path):
    layout = RunLayout(tmp_path)

    def dies(out):
        (out / "half.parquet").write_bytes(b"PAR1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(layout, "demo", "f1", dies, code_version="1", config={}, upstream={})
    assert not (tmp_path / "demo" / "f1").exists()
    calls = []
    assert not _run(layout, calls).reused and len(calls) == 1


def test_a_second_writer_waits_for_the_first_and_reuses_its_output(tmp_path):
    """Two runs reaching one output at once (threads here; processes hold the same flock): one builds and
    commits, the other is told it waits, then reuses the committed output without building."""
    layout, started, release = RunLayout(tmp_path), threading.Event(), threading.Event()
    first_calls, second_calls, waits, results = [], [], [], {}

    def slow(out):
        first_calls.append(out)
        started.set()
        assert release.wait(30)
        return _writer([])(out)

    def first():
        results["first"] = run_stage(layout, "demo", "f1", slow, code_version="1", config={}, upstream={})

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)

    def second():
        results["second"] = run_stage(
            layout,
            "demo",
            "f1",
            _writer(second_calls),
            code_version="1",
            config={},
            upstream={},
            on_wait=waits.append,
        )

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.5)
    assert (
        waiter.is_alive() and len(waits) == 1 and "demo f1" in waits[0]
    )  # blocked on the lock, said so once
    release.set()
    thread.join(30)
    waiter.join(30)
    assert not results["first"].reused and results["second"].reused and not second_calls
    assert results["second"].manifest.digest == results["first"].manifest.digest
    assert not layout.partial_dir("demo", "f1").exists()


HOLDER = """
import sys, time
from pathlib import Path
from ppd_core.layout import RunLayout
from ppd_core.manifest import run_stage

def build(out):
    (out / "half.txt").write_text("from the killed process")
    print("building", flush=True)
    time.sleep(600)

run_stage(RunLayout(sys.argv[1]), "demo", "f1", build, code_version="1", config={}, upstream={})
"""


def test_the_lock_of_a_killed_builder_is_taken_over(tmp_path):
    """``kill -9`` of the process building an output frees its lock at once (no stale lock to remove): the
    next run builds into a cleared partial directory and commits."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"
        layout = RunLayout(tmp_path)
        assert locks.is_held(layout.lock_path("demo", "f1"))
    finally:
        proc.kill()
        proc.wait(30)
    assert not locks.is_held(layout.lock_path("demo", "f1"))
    calls, waits = [], []
    outcome = run_stage(
        layout, "demo", "f1", _writer(calls), code_version="1", config={}, upstream={}, on_wait=waits.append
    )
    assert not outcome.reused and len(calls) == 1 and not waits
    assert set(outcome.manifest.files) == {"a.txt", "sub/b.bin"}  # the killed attempt's file was cleared


def test_temporaries_of_a_writer_killed_mid_write_are_never_committed(tmp_path):
    """A shard worker that died mid-write leaves its atomic write's hidden temporary; its shard was redone
    by another. The commit drops the temporary: the output lists and holds only complete files."""

    def build(partial):
        (partial / "clip").mkdir()
        (partial / "clip" / "shard-00000.parquet").write_bytes(b"done")
        (partial / "clip" / ".shard-00001.parquet.0f3a.tmp").write_bytes(b"half")  # the dead worker's
        (partial / "clip" / "shard-00001.parquet").write_bytes(b"redone")
        return {"shards": 2}

    out = run_stage(RunLayout(tmp_path), "demo", "f1", build, code_version="1", config={}, upstream={})
    assert sorted(out.manifest.files) == ["clip/shard-00000.parquet", "clip/shard-00001.parquet"]
    assert not list(out.directory.rglob("*.tmp")) and is_complete(out.directory)

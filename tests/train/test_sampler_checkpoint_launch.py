"""Resumable pair order, checkpoint rotation/markers, and the process-group launcher."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from ppd_core.errors import StageError
from ppd_core.train import checkpoint, launch
from ppd_core.train.sampler import PairSampler
from tests.conftest import running as _alive


def test_sampler_is_a_pure_function_of_the_step():
    a, b = PairSampler(50, 8, seed=3), PairSampler(50, 8, seed=3)
    assert np.array_equal(a.batch(17), b.batch(17))
    assert not np.array_equal(a.batch(17), PairSampler(50, 8, seed=4).batch(17))
    # an epoch visits every pair once, across the epoch boundary too
    seen = np.concatenate([a.global_batch(s) for s in range(25)])  # 200 = 4 epochs
    for e in range(4):
        assert sorted(seen[e * 50 : (e + 1) * 50].tolist()) == list(range(50))


def test_sampler_splits_the_global_batch_across_ranks():
    ranks = [PairSampler(40, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    whole = PairSampler(40, 8, seed=0).global_batch(5)
    assert np.array_equal(np.concatenate([r.batch(5) for r in ranks]), whole)
    with pytest.raises(ValueError):
        PairSampler(40, 7, seed=0, world_size=2)


def test_rng_capture_restore_round_trip():
    state = checkpoint.capture_rng()
    first = (torch.rand(3), np.random.rand(3))
    checkpoint.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_rotation_keeps_complete_and_drops_stale(tmp_path):
    for step, complete in ((100, True), (200, True), (250, False), (300, True), (400, False)):
        d = tmp_path / checkpoint.tag_for(step)
        d.mkdir()
        if complete:
            (d / checkpoint.COMPLETE).write_text(str(step))
    assert checkpoint.latest(tmp_path)[0] == 300
    checkpoint.rotate(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    # 100 rotated out, 250 (incomplete, older than the newest complete) removed, 400 may still be in progress
    assert left == [checkpoint.tag_for(s) for s in (200, 300, 400)]


def test_commands_pass_through_launcher_options(tmp_path):
    ds = launch.build_command("deepspeed", "pkg.mod", ["--x", "1"], num_gpus=2, port=1234)
    assert ds[-4:] == ["--module", "pkg.mod", "--x", "1"] and "--num_gpus" in ds and "2" in ds
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    assert "--hostfile" in launch.build_command("deepspeed", "m", [], hostfile=str(hostfile))
    tr = launch.build_command("torchrun", "pkg.mod", [], num_gpus=3, port=1234)
    assert tr[:3] == [sys.executable, "-m", "torch.distributed.run"] and "3" in tr
    with pytest.raises(StageError, match="hostfile not found"):
        launch.build_command("deepspeed", "m", [], hostfile=str(tmp_path / "missing"))


def test_one_local_rank_starts_without_a_launcher_and_several_through_one(tmp_path):
    cmd, env = launch.rank_command("deepspeed", "pkg.mod", ["--x", "1"], num_gpus=1)
    assert cmd == [sys.executable, "-u", "-m", "pkg.mod", "--x", "1"]
    assert (
        env["RANK"] == env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0
    )
    cmd, env = launch.rank_command("deepspeed", "pkg.mod", [], num_gpus=2)
    assert "--num_gpus" in cmd and env == {}
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    assert "--hostfile" in launch.rank_command("deepspeed", "m", [], num_gpus=1, hostfile=str(hostfile))[0]


def test_failed_run_is_a_clear_error_with_the_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"]
    with pytest.raises(StageError, match="code 3") as e:
        launch.run(cmd, tmp_path / "log.txt")
    assert "about to fail" in str(e.value) and "about to fail" in (tmp_path / "log.txt").read_text()


def test_a_failed_worker_is_one_line_naming_its_error_and_the_log(tmp_path):
    """The log was streamed as it came; the error names the worker's own exception once, not the launcher's
    CalledProcessError, and does not repeat the log."""
    script = (
        "import sys\n"
        "print('step 1 ok', flush=True)\n"
        "print('[rank0]: Traceback (most recent call last):', flush=True)\n"
        "print('[rank0]: ppd_core.errors.ConfigError: user tokens are 33 wide', flush=True)\n"
        "print('subprocess.CalledProcessError: Command [python] returned non-zero exit status 1.', flush=True)\n"
        "sys.exit(1)"
    )
    with pytest.raises(StageError) as e:
        launch.run([sys.executable, "-c", script], tmp_path / "log.txt")
    message = str(e.value)
    assert "\n" not in message and "step 1 ok" not in message
    assert message.startswith(
        "training exited with code 1: ppd_core.errors.ConfigError: user tokens are 33 wide"
    )
    assert str(tmp_path / "log.txt") in message


def test_a_worker_killed_by_a_signal_is_transient_not_a_stage_error(tmp_path):
    cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(RuntimeError, match="killed") as e:
        launch.run(cmd, tmp_path / "log.txt")
    assert not isinstance(e.value, StageError)  # retried by the flow, unlike a deterministic failure


def test_interrupt_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # the launched process starts a grandchild that would outlive a plain kill of its parent
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "for _ in range(6000): print('tick', flush=True); time.sleep(0.1)"
    )
    errors = []

    def target():
        try:
            launch.run([sys.executable, "-c", script], tmp_path / "log.txt", grace_s=2)
        except BaseException as exc:  # noqa: BLE001 - we inject KeyboardInterrupt below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.time() + 30
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    # simulate a cancelled flow: the reading loop is interrupted -> the group is killed
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt)
    )
    thread.join(30)
    assert not thread.is_alive() and errors and isinstance(errors[0], KeyboardInterrupt)
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        subprocess.run(["kill", "-9", str(grandchild)], check=False)
        pytest.fail("grandchild survived the group kill")


def test_sigterm_to_the_caller_kills_the_whole_process_group(tmp_path):
    """A Prefect runner cancels a flow run with SIGTERM: no rank may outlive the flow process."""
    import signal
    import subprocess

    pidfile = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)"
    )
    caller = (
        "import sys; from pathlib import Path; from ppd_core.train import launch\n"
        f"launch.run([sys.executable, '-c', {script!r}], Path({str(tmp_path / 'log.txt')!r}), grace_s=2)"
    )
    proc = subprocess.Popen([sys.executable, "-c", caller])
    deadline = time.time() + 60
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) != 0
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_watchdog_tells_when_the_launching_process_is_gone():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    token = launch.process_token(gone.pid)
    gone.wait()
    assert not launch.process_alive(token) and launch.process_alive(launch.process_token())
    assert not launch.process_alive(
        f"{launch.process_token().rsplit(':', 1)[0]}:1"
    )  # our pid, another start time
    reasons: list[str] = []
    launch.watch_parent(token, reasons.append, interval_s=0.05).join(10)
    assert reasons and "is gone" in reasons[0]
    alive: list[str] = []
    launch.watch_parent(launch.process_token(), alive.append, interval_s=0.05).join(0.3)
    assert not alive


def test_a_killed_caller_takes_the_launcher_and_its_ranks_with_it(tmp_path):
    """``kill -9`` of the process in launch.run (``ppd``) runs no handler: the launcher dies of its parent-death
    signal and a rank it started (reparented, in the launcher's session) ends through its watchdog."""
    pids = tmp_path / "pids"
    rank = "import time; from ppd_core.train import launch\nlaunch.exit_with_parent(0.1)\ntime.sleep(600)"
    launcher = (
        "import os, subprocess, sys, time\n"
        f"rank = subprocess.Popen([sys.executable, '-c', {rank!r}])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{rank.pid}}')\n"
        "time.sleep(600)"
    )
    caller = (
        "import sys; from pathlib import Path; from ppd_core.train import launch\n"
        f"launch.run([sys.executable, '-c', {launcher!r}], Path({str(tmp_path / 'log.txt')!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", caller])
    deadline = time.time() + 60
    while not (pids.exists() and pids.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    launcher_pid, rank_pid = map(int, pids.read_text().split())
    time.sleep(1.0)  # the rank's watchdog is running
    assert _alive(launcher_pid) and _alive(rank_pid)
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while (_alive(launcher_pid) or _alive(rank_pid)) and time.time() < deadline:
        time.sleep(0.1)
    survivors = [p for p in (launcher_pid, rank_pid) if _alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors


def test_a_new_launch_waits_for_ranks_of_an_earlier_one(tmp_path):
    lock = launch.ranks_lock_path(tmp_path / "run")
    hold = f"import time; from pathlib import Path; from ppd_core.train import launch\nlaunch.hold_as_rank(Path({str(lock)!r})); print('held', flush=True); time.sleep(1.5)"
    rank = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "held"
    waits: list[str] = []
    t0 = time.monotonic()
    launch.wait_for_ranks(lock, waits.append)
    assert time.monotonic() - t0 > 0.5 and len(waits) == 1 and rank.wait(10) == 0
    launch.wait_for_ranks(lock, waits.append)  # nobody holds it now: no wait
    assert len(waits) == 1


def test_resume_forgets_what_was_logged_past_the_checkpoint(tmp_path):
    """Rank 0 resuming at the step-4 checkpoint keeps steps 1..4 of the logs once (a killed attempt had logged
    5 and half of 6); from scratch (no checkpoint) it starts the logs afresh."""
    from ppd_core.train.worker import forget_after

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in range(1, 6)) + '{"step": 6, "lo')
    (tmp_path / "validation.jsonl").write_text('{"step": 2, "acc": 0.5}\n{"step": 4, "acc": 0.6}\n')
    forget_after(tmp_path, 4)
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert len((tmp_path / "validation.jsonl").read_text().splitlines()) == 2  # both at or before step 4
    forget_after(tmp_path, 0)
    assert metrics.read_text() == "" and (tmp_path / "validation.jsonl").read_text() == ""


def _tensorboard(directory):
    """(event file names, [(step, tag)] in file order)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(directory.glob("events.out.tfevents.*"))
    history = [
        (e.step, v.tag) for f in files for e in EventFileLoader(str(f)).Load() for v in e.summary.value
    ]
    return [f.name for f in files], history


def test_resumed_tensorboard_is_one_file_with_each_step_once(tmp_path):
    """Two killed attempts left two event files (the second resumed at step 2 and logged 3..5 again, its last
    record cut short); resuming at the step-4 checkpoint leaves one file with steps 1..4 once, to which the
    resumed run appends; a resume killed right after rewriting the history is merged again."""
    from torch.utils.tensorboard import SummaryWriter

    from ppd_core.manifest import resume_tensorboard

    tb = tmp_path / "tensorboard"
    for steps in (range(1, 6), range(3, 6)):
        writer = SummaryWriter(str(tb))
        for step in steps:
            writer.add_scalar("train/loss", 1.0 / step, step)
        writer.close()
        time.sleep(1.1)  # event file names carry the second they were created in
    newest = sorted(tb.glob("events.out.tfevents.*"))[-1]
    newest.write_bytes(newest.read_bytes()[:-7])  # a kill in the middle of a record
    writer = resume_tensorboard(tb, 4)
    names, history = _tensorboard(tb)
    assert len(names) == 1 and history == [(s, "train/loss") for s in (1, 2, 3, 4)]
    for step in (5, 6):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.close()
    names, history = _tensorboard(tb)
    assert len(names) == 1 and history == [(s, "train/loss") for s in range(1, 7)]
    # killed between writing the merged history and removing the earlier file: two copies, merged next time
    copy = tb / f"events.out.tfevents.{int(time.time()) + 5}.copy"
    copy.write_bytes((tb / names[0]).read_bytes())
    resume_tensorboard(tb, 6).close()
    names, history = _tensorboard(tb)
    assert len(names) == 1 and history == [(s, "train/loss") for s in range(1, 7)]
    resume_tensorboard(tb, 0).close()  # from scratch: nothing earlier is kept
    names, history = _tensorboard(tb)
    assert len(names) == 1 and history == []


def test_rng_file_loads_with_weights_only_and_restores_exactly(tmp_path):
    random.random(), np.random.randn(), torch.randn(1)  # an advanced state, gaussian cache included
    state = {"global": checkpoint.capture_rng()}
    path = tmp_path / "step-00000001" / "rng-rank0.pt"
    path.parent.mkdir()
    path.write_bytes(checkpoint._to_bytes(checkpoint.encode_rng(state)))
    torch.load(path, weights_only=True)  # no pickled object needed
    first = (random.random(), np.random.randn(3), torch.rand(3))
    checkpoint.restore_rng(checkpoint.read_rng(path)["global"])
    again = (random.random(), np.random.randn(3), torch.rand(3))
    assert first[0] == again[0] and np.array_equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_old_pickled_rng_file_is_a_clear_error(tmp_path):
    path = tmp_path / "step-00000001" / "rng-rank0.pt"
    path.parent.mkdir()
    torch.save({"global": checkpoint.capture_rng()}, path)  # the earlier format: numpy arrays pickled
    with pytest.raises(StageError, match="older format that cannot be loaded safely"):
        checkpoint.read_rng(path)


def _port_binding_module(tmp_path):
    """A rank stand-in that binds its MASTER_PORT as the rendezvous does, and fails as it does when it is taken."""
    (tmp_path / "bind_rank.py").write_text(
        "import os, socket\n"
        "s = socket.socket()\n"
        "s.bind(('127.0.0.1', int(os.environ['MASTER_PORT'])))\n"
        "print('rank bound', os.environ['MASTER_PORT'], flush=True)\n"
    )
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_a_rendezvous_port_taken_after_it_was_chosen_is_launched_again_on_a_fresh_one(tmp_path, monkeypatch):
    """Between choosing a free port and the ranks binding it, another process can take it: the launch is
    started again on a fresh port (and says so), not reported as a failed training."""
    env = _port_binding_module(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fresh = launch.free_port()
        ports = iter([taken.getsockname()[1], fresh])
        monkeypatch.setattr(launch, "free_port", lambda: next(ports))
        said = []
        launch.launch_ranks("deepspeed", "bind_rank", [], tmp_path / "log.txt", env=env, on_retry=said.append)
    log = (tmp_path / "log.txt").read_text()
    assert "Address already in use" in log and f"rank bound {fresh}" in log
    assert len(said) == 1 and "rendezvous port" in said[0] and "2 of 3" in said[0]


def test_a_port_taken_at_every_launch_is_transient_and_not_retried_forever(tmp_path, monkeypatch):
    env = _port_binding_module(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(launch, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(launch.PortTaken, match="rendezvous port") as e:
            launch.launch_ranks("deepspeed", "bind_rank", [], tmp_path / "log.txt", env=env)
    assert not isinstance(e.value, StageError)  # the flow's own retries may still succeed
    assert (tmp_path / "log.txt").read_text().count("Address already in use") == launch.PORT_ATTEMPTS


def test_a_failure_that_only_an_earlier_launch_logged_is_not_taken_for_a_port_clash(tmp_path):
    """The log keeps earlier launches' output; only this launch's lines decide whether its port was taken."""
    (tmp_path / "log.txt").write_text("OSError: [Errno 98] Address already in use\n")
    with pytest.raises(StageError, match="code 3"):
        launch.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt")

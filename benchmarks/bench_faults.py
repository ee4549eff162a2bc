"""Fault-injection benchmark (`make bench`): ``kill -9`` of a whole ``ppd run`` process group mid-stage, then
the same command again; and two ``ppd run`` started together on one root. Writes
benchmarks/results/faults.json and exits non-zero when any check fails.

Kill trials, for each of ingest, embed, train (``train_ppd``) and evaluate:

1. the upstream stages are computed once (``prepared``); every trial starts from a copy of that root
   without the stage's output, so all trials start from the same state;
2. an uninterrupted ``ppd run --stages <stage>`` on such a copy is the reference: its outputs, and the
   stage's duration (from its partial directory appearing to its output being committed);
3. per trial: the same command in its own process group, ``kill -9`` of the group at a seeded random
   moment within that duration (counted from the partial directory appearing), then the command again.

Checked per trial: the rerun exits 0 (``completed``); 10 s after the kill no process of the killed run
is alive (its process tree and process group, and any training rank naming it in its environment:
``no_survivors``); no directory that a reader takes as complete is incomplete, after the kill or after
the rerun, and the rerun's output is the reference's fingerprint directory (``no_partial_as_complete``);
the outputs equal the reference's (``identical``): embedding shards, exported weights and the image
store byte for byte (sha256), every Parquet table row for row, ``metrics.jsonl``/``validation.jsonl``
with the reference's steps each once, and one TensorBoard event file whose history (tag, step) is the
reference's, no step twice; the same set of files.

Concurrent trials: two ``ppd run --stages embed`` on one fresh root (the synthetic world, ingestion,
tiny models, relabelling, few-shot sampling, embeddings), the second started 0-2.5 s (seeded) after the
first, each with Prefect in its embedded mode (each creates or opens the root's database): both exit 0
(``both_completed``) and each stage is computed by exactly one of them (``computed_once``, from each
run's ``--json`` report: computed or cached).

The kill trials talk to one Prefect server that this script starts for them (``ppd ui --background`` on a
root of its own; ``--embedded`` runs each command with its own temporary server instead, about 20 s more
per command on 2 cores). Settings: :data:`SETTINGS` (a small world, few steps), recorded in the JSON.

The functions under "helpers" are meant for reuse by tests: ``tests/test_cli.py``'s slow kill test uses
:func:`launched_by`, :func:`kill_group`, :func:`survivors`, :func:`reap` and :func:`tensorboard_history`
(imported as ``benchmarks.bench_faults`` from the repository root).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "faults.json"
PPD = str(Path(sys.executable).with_name("ppd"))
PARENT_ENV = (
    "PPD_PARENT_PROCESS"  # ppd_core.train.launch.PARENT_ENV: the ranks' record of the ppd that launched them
)

SETTINGS = [
    "world.num_users=16",
    "world.mean_pairs_per_user=30",
    "embed.embedders=[{name: vlm-image_diff, kind: vlm, readout: image_diff}]",
    "embed.default=vlm-image_diff",
    "embed.shard_sets=4",
    "train.trainers=[ppd]",
    "train.ceiling_embedder=null",
    "train.shots_ceiling_embedder=null",
    "pretrain.steps=10",
    "pretrain.batch_size=16",
    "train.steps=12",
    "train.pairs_per_step=8",
    "train.checkpoint_every=3",
    "train.validate_every=6",
    "train.log_every=1",
    "probe.epochs=2",
    "probe.pair_steps=50",
    "evaluate.seen_users=4",
    "evaluate.unseen_users=4",
    "evaluate.prompts_per_user=2",
    "evaluate.seeds_per_prompt=1",
    "evaluate.interpolation_prompts=2",
    "evaluate.agreement_pairs=16",
    "evaluate.bootstrap=50",
]
KILLED = {"ingest": "ingest", "embed": "embed", "train": "train_ppd", "evaluate": "evaluate"}
CONCURRENT_STAGES = "embed"
SURVIVOR_WAIT_S = 10.0
RUN_TIMEOUT_S = 900.0
# files compared byte for byte (beyond these, Parquet tables are compared row for row)
BITWISE_SUFFIXES = (".safetensors", ".tar")
BITWISE_DIRS = (
    "export",
    "vlm-image_diff",
)  # exported adapter and embeddings; embed writes one dir per embedder


# ------------------------------------------------------------------------------------------------ helpers
# (reused by tests/test_cli.py: keep them free of the benchmark's state)


def ppd_env(api_url: str | None = None) -> dict[str, str]:
    """The environment of a ``ppd`` command: this checkout first on the path, CPU DeepSpeed, no analytics,
    and either the given Prefect server or Prefect's embedded mode."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_group(
    args: Sequence[str], log: Path, env: dict[str, str], stdout: Path | None = None
) -> subprocess.Popen:
    """Start ``args`` as the leader of a new process group (and session), as a shell would start a job."""
    with open(log, "ab") as err, open(stdout or os.devnull, "wb") as out:
        return subprocess.Popen(list(args), stdout=out, stderr=err, cwd=REPO, env=env, start_new_session=True)


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (processes that left its session, e.g. the training launcher, included)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def launched_by(pid: int) -> list[psutil.Process]:
    """Processes whose environment says that process ``pid`` of this host launched them (training ranks
    record their ``ppd`` in ``$PPD_PARENT_PROCESS``; they stay findable after being reparented)."""
    host = socket.gethostname()
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            token = p.environ().get(PARENT_ENV, "")
            if token.count(":") >= 2:
                t_host, t_pid, _ = token.rsplit(":", 2)
                if t_host == host and t_pid == str(pid):
                    found.append(p)
    return found


def in_group(pgid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid:
                found.append(p)
    return found


def kill_group(proc: subprocess.Popen) -> list[psutil.Process]:
    """``kill -9`` the process group led by ``proc``; returns what ran under it just before (its process
    tree and the ranks naming it), for :func:`survivors`."""
    seen = {p.pid: p for p in [*process_tree(proc.pid), *launched_by(proc.pid)]}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return list(seen.values())


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def survivors(
    pid: int, seen: Sequence[psutil.Process], wait_s: float = SURVIVOR_WAIT_S
) -> tuple[list[str], float]:
    """Processes of the killed run ``pid`` still alive ``wait_s`` after the kill: any of ``seen``, of its
    process group, or naming it as their launcher. Returns (descriptions, seconds until all were gone)."""
    t0 = time.monotonic()
    while True:
        left = {p.pid: p for p in [*seen, *in_group(pid), *launched_by(pid)] if _alive(p)}
        elapsed = time.monotonic() - t0
        if not left or elapsed >= wait_s:
            break
        time.sleep(0.2)
    described = []
    for p in left.values():
        with contextlib.suppress(psutil.Error):
            described.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
    return described, round(elapsed, 2)


def reap(procs: Sequence[psutil.Process]) -> None:
    """SIGKILL what :func:`survivors` reported, so that one failed trial does not disturb the next."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def incomplete_outputs(root: Path) -> list[str]:
    """Problems of stage output directories that a reader would take as complete (every directory under
    ``<root>/<stage>/`` whose name is not hidden): each must verify against its manifest."""
    from ppd_core.manifest import verify

    bad = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if stage_dir.name == "partitions":
            continue
        for out in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            bad += [f"{out.relative_to(root)}: {problem}" for problem in verify(out)]
    return bad


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def jsonl_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def tensorboard_history(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(event file names, [(tag, step)] of every summary value in file order) of a TensorBoard directory."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(p for p in directory.glob("events.out.tfevents.*") if p.is_file())
    history = []
    for f in files:
        for event in EventFileLoader(str(f)).Load():
            for value in event.summary.value:
                history.append((value.tag, int(event.step)))
    return [f.name for f in files], history


def compare_outputs(reference: Path, output: Path) -> list[str]:
    """Differences of ``output`` from ``reference`` (two committed outputs of one stage and fingerprint)
    that break the contract: bitwise files (weights, embeddings, image shards), Parquet tables row for row,
    metrics/validation logs with the reference's steps each once, one TensorBoard event file with the
    reference's (tag, step) history, and the same file list. Timings, logs and renders are not compared."""
    import pyarrow.parquet as pq

    problems = []

    def files(d: Path) -> set[str]:
        listed = json.loads((d / "manifest.json").read_text())["files"]
        return {f for f in listed if "/events.out.tfevents." not in f}

    ref_files, out_files = files(reference), files(output)
    if ref_files != out_files:
        problems.append(
            f"file lists differ: only in reference {sorted(ref_files - out_files)[:5]}, "
            f"only in rerun {sorted(out_files - ref_files)[:5]}"
        )
    for rel in sorted(ref_files & out_files):
        a, b = reference / rel, output / rel
        top = rel.split("/", 1)[0]
        if rel.endswith(BITWISE_SUFFIXES) or (top in BITWISE_DIRS and rel.endswith(".parquet")):
            if sha256(a) != sha256(b):
                problems.append(f"{rel}: not bitwise identical")
        elif rel.endswith(".parquet"):
            ta, tb = pq.read_table(a), pq.read_table(b)
            if ta.schema != tb.schema or not ta.equals(tb):
                problems.append(f"{rel}: table differs ({ta.num_rows} vs {tb.num_rows} rows)")
        elif rel in ("metrics.jsonl", "validation.jsonl"):
            steps, ref_steps = jsonl_steps(b), jsonl_steps(a)
            if len(set(steps)) != len(steps):
                problems.append(f"{rel}: duplicate steps {sorted({s for s in steps if steps.count(s) > 1})}")
            if steps != ref_steps:
                problems.append(f"{rel}: steps {steps} != reference {ref_steps}")
    if (reference / "tensorboard").is_dir():
        ref_names, ref_history = tensorboard_history(reference / "tensorboard")
        names, history = tensorboard_history(output / "tensorboard")
        if len(names) != 1:
            problems.append(f"tensorboard: {len(names)} event files ({names})")
        if len(set(history)) != len(history):
            problems.append("tensorboard: a (tag, step) logged twice")
        if sorted(set(history)) != sorted(set(ref_history)):
            problems.append(
                f"tensorboard: history differs from the reference ({len(set(history))} vs {len(set(ref_history))} values)"
            )
    return problems


# --------------------------------------------------------------------------------------------- benchmark


class Bench:
    def __init__(self, work: Path, api_url: str | None, timeout_s: float = RUN_TIMEOUT_S):
        self.work, self.api_url, self.timeout_s = work, api_url, timeout_s
        self.sets = [a for s in SETTINGS for a in ("--set", s)]
        self.root = work / "run"  # every kill trial's root

    def command(self, root: Path, stages: str) -> list[str]:
        return [PPD, "run", "--root", str(root), "--stages", stages, "--json", *self.sets]

    def run(self, root: Path, stages: str, name: str, embedded: bool = False) -> tuple[int, dict | None]:
        """One ``ppd run`` to its end; returns (exit code, its ``--json`` report)."""
        out, log = self.work / f"{name}.json", self.work / f"{name}.log"
        env = ppd_env(None if embedded else self.api_url)
        proc = start_group(self.command(root, stages), log, env, stdout=out)
        return self._finish(proc, out), _report(out)

    def _finish(self, proc: subprocess.Popen, out: Path) -> int:
        try:
            return proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return -9

    def restore(self, prepared: Path, stage: str) -> Path:
        """The run root (always one path: outputs record paths under it) as prepared, without ``stage``."""
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(
            prepared, self.root, symlinks=True, ignore=lambda d, names: [stage] if Path(d) == prepared else []
        )
        return self.root

    def timed_reference(self, prepared: Path, stage: str) -> dict:
        """The uninterrupted run of ``stage`` on the prepared root: its output (moved aside) and its duration."""
        root = self.restore(prepared, stage)
        log, out = self.work / f"{stage}-reference.log", self.work / f"{stage}-reference.json"
        proc = start_group(self.command(root, stage), log, ppd_env(self.api_url), stdout=out)
        started = _wait_for(lambda: _partial(root, stage), proc, self.timeout_s)
        committed = _wait_for(lambda: _committed(root, stage), proc, self.timeout_s)
        rc = self._finish(proc, out)
        report = _report(out)
        if rc != 0 or report is None or started is None or committed is None:
            raise SystemExit(f"the uninterrupted {stage} run failed (exit {rc}); see {log}")
        output = Path(_stage_report(report, stage)["output_dir"])
        kept = self.work / "reference" / stage / output.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.rename(output, kept)
        return {"dir": kept, "seconds": committed - started}

    def kill_trial(self, prepared: Path, stage: str, reference: dict, fraction: float, i: int) -> dict:
        root = self.restore(prepared, stage)
        name = f"{stage}-trial{i}"
        proc = start_group(self.command(root, stage), self.work / f"{name}-killed.log", ppd_env(self.api_url))
        started = _wait_for(lambda: _partial(root, stage), proc, self.timeout_s)
        trial: dict = {"fraction": round(fraction, 4)}
        if started is None:
            kill_group(proc)
            return {**trial, "error": "the stage never started", "checks": {}}
        delay = fraction * reference["seconds"]
        time.sleep(max(0.0, started + delay - time.monotonic()))
        trial["committed_before_kill"] = _committed(root, stage)
        trial["exited_before_kill"] = proc.poll() is not None
        seen = kill_group(proc)
        trial["killed_after_s"] = round(time.monotonic() - started, 3)
        left, gone_after = survivors(proc.pid, seen)
        reap([p for p in seen if _alive(p)])
        trial["processes_killed"] = len(seen)
        trial["all_gone_after_s"] = gone_after
        after_kill = incomplete_outputs(root)
        rc, report = self.run(root, stage, f"{name}-rerun")
        problems = []
        output = None
        if rc == 0 and report is not None:
            output = Path(_stage_report(report, stage)["output_dir"])
            if output.name != reference["dir"].name:
                problems.append(f"rerun committed {output.name}, reference {reference['dir'].name}")
        after_rerun = incomplete_outputs(root)
        differences = compare_outputs(reference["dir"], output) if output is not None else ["no output"]
        trial.update(
            {
                "rerun_exit_code": rc,
                "rerun_cached": _stage_report(report, stage)["cached"] if report else None,
                "survivors": left,
                "incomplete_after_kill": after_kill,
                "incomplete_after_rerun": after_rerun + problems,
                "differences": differences,
                "checks": {
                    "completed": rc == 0,
                    "no_survivors": not left,
                    "no_partial_as_complete": not after_kill and not after_rerun and not problems,
                    "identical": output is not None and not differences,
                },
            }
        )
        if not all(trial["checks"].values()):
            kept = self.work / "failed" / name
            shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(root / stage, kept, symlinks=True)  # for a look afterwards (with --work)
        return trial

    def concurrent_trial(self, offset: float, i: int) -> dict:
        root = self.work / f"concurrent{i}"
        shutil.rmtree(root, ignore_errors=True)
        procs, outs = [], []
        for j in range(2):
            if j:
                time.sleep(offset)
            outs.append(self.work / f"concurrent{i}-{j}.json")
            procs.append(
                start_group(
                    self.command(root, CONCURRENT_STAGES),
                    self.work / f"concurrent{i}-{j}.log",
                    ppd_env(None),
                    outs[j],
                )
            )
        codes = [self._finish(p, o) for p, o in zip(procs, outs, strict=True)]
        reports = [_report(o) for o in outs]
        computed: dict[str, int] = {}
        for r in reports:
            for s in (r or {}).get("stages", []):
                computed[s["name"]] = computed.get(s["name"], 0) + (0 if s["cached"] else 1)
        expected = {s["name"] for r in reports if r for s in r["stages"]}
        incomplete = incomplete_outputs(root) if root.is_dir() else ["no root"]
        leftovers = (
            sorted(str(p.relative_to(root)) for p in root.glob("*/.*.partial")) if root.is_dir() else []
        )
        trial = {
            "offset_s": round(offset, 3),
            "exit_codes": codes,
            "computed_per_stage": computed,
            "incomplete": incomplete,
            "partial_left": leftovers,
            "checks": {
                "both_completed": codes == [0, 0] and all(reports),
                "computed_once": bool(expected) and all(computed.get(s) == 1 for s in expected),
                "no_partial_as_complete": not incomplete,
            },
        }
        if all(trial["checks"].values()):
            shutil.rmtree(root, ignore_errors=True)
        return trial


def _report(out: Path) -> dict | None:
    try:
        return json.loads(out.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _stage_report(report: dict, stage: str) -> dict:
    return next(s for s in report["stages"] if s["name"] == stage)


def _partial(root: Path, stage: str) -> bool:
    return any(p.is_dir() for p in (root / stage).glob(".*.partial"))


def _committed(root: Path, stage: str) -> bool:
    return any((p / "manifest.json").is_file() for p in (root / stage).glob("[0-9a-f]*"))


def _wait_for(condition, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.005) -> float | None:
    """Monotonic time at which ``condition()`` first held (None: ``proc`` ended or time ran out first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        if proc.poll() is not None:
            return time.monotonic() if condition() else None
        time.sleep(poll_s)
    return None


def _counts(trials: list[dict]) -> dict:
    keys = sorted({k for t in trials for k in t["checks"]})
    return {k: sum(bool(t["checks"].get(k)) for t in trials) for k in keys} | {"trials": len(trials)}


@contextlib.contextmanager
def prefect_server(home: Path):
    """A Prefect server (``ppd ui --background``) for the kill trials; stopped on exit."""
    env = ppd_env()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [PPD, "ui", "--root", str(home), "--port", str(port), "--background"],
        env=env, cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield (home / ".prefect" / "api_url").read_text().strip()
    finally:
        subprocess.run([PPD, "ui", "--stop", "--root", str(home)], env=env, cwd=REPO, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="kill trials per stage and concurrent trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(KILLED), help="which kill trials: " + ",".join(KILLED))
    ap.add_argument("--no-concurrent", action="store_true", help="skip the concurrent-run trials")
    ap.add_argument("--embedded", action="store_true", help="kill trials without a shared Prefect server")
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t_start = time.monotonic()
    rng = random.Random(args.seed)
    chosen = [k for k in args.stages.split(",") if k]
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ppd-faults-")))
        work.mkdir(parents=True, exist_ok=True)
        api_url = None if args.embedded else stack.enter_context(prefect_server(work / "prefect-server"))
        bench = Bench(work, api_url)
        result: dict = {
            "cpu_count": os.cpu_count(),
            "settings": SETTINGS,
            "prefect": "embedded per command" if args.embedded else "one shared server (ppd ui --background)",
            "seed": args.seed,
            "trials_per_stage": args.trials,
            "survivor_wait_s": SURVIVOR_WAIT_S,
            "stages": {},
        }
        fractions = {k: [rng.random() for _ in range(args.trials)] for k in KILLED}
        offsets = [rng.uniform(0.0, 2.5) for _ in range(args.trials)]
        if chosen:
            prepared = work / "prepared"
            t0 = time.monotonic()
            rc, _ = bench.run(bench.root, "evaluate", "prepare")
            if rc != 0:
                raise SystemExit(f"preparing the root failed (exit {rc}); see {work / 'prepare.log'}")
            shutil.rmtree(prepared, ignore_errors=True)
            shutil.copytree(bench.root, prepared, symlinks=True)
            result["prepare_s"] = round(time.monotonic() - t0, 1)
        for key in chosen:
            stage = KILLED[key]
            t0 = time.monotonic()
            reference = bench.timed_reference(prepared, stage)
            trials = []
            for i, fraction in enumerate(fractions[key]):
                trials.append(bench.kill_trial(prepared, stage, reference, fraction, i))
                print(f"{stage} trial {i}: {trials[-1]['checks']}", flush=True)
            result["stages"][key] = {
                "stage": stage,
                "uninterrupted_stage_s": round(reference["seconds"], 3),
                "counts": _counts(trials),
                # informational: kills that landed before the stage committed its output (on a busy machine a
                # trial can run faster than the reference, and a late moment then finds the stage done)
                "killed_before_commit": sum(not t.get("committed_before_kill", True) for t in trials),
                "trials": trials,
                "wall_s": round(time.monotonic() - t0, 1),
            }
        if not args.no_concurrent:
            t0 = time.monotonic()
            trials = []
            for i, offset in enumerate(offsets):
                trials.append(bench.concurrent_trial(offset, i))
                print(f"concurrent trial {i}: {trials[-1]['checks']}", flush=True)
            result["concurrent"] = {
                "stages": CONCURRENT_STAGES,
                "prefect": "embedded per command",
                "counts": _counts(trials),
                "trials": trials,
                "wall_s": round(time.monotonic() - t0, 1),
            }
    parts = [*result["stages"].values(), *([result["concurrent"]] if "concurrent" in result else [])]
    failed = [
        f"{p.get('stage', 'concurrent')}: {k} {n}/{p['counts']['trials']}"
        for p in parts
        for k, n in p["counts"].items()
        if k != "trials" and n != p["counts"]["trials"]
    ]
    result["all_hold"] = not failed
    result["failed"] = failed
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({"all_hold": result["all_hold"], "failed": failed, "wall_s": result["wall_s"]}, indent=2)
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

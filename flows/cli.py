"""The ``ppd`` command line. Thin: parse, resolve the config, call a flow.

Spellings are a contract used by scripts and schedules::

    ppd run [--config FILE] [--root DIR] [--source PATH_OR_URL] [--stages a,b,...]
            [--partitioned [--start YYYY-MM-DD] [--end YYYY-MM-DD]] [--set key=value]... [--json]
    ppd backfill [--config FILE] --root DIR --source PATH_OR_URL --start YYYY-MM-DD --end YYYY-MM-DD
                 [--force] [--stages a,b,...] [--json]
    ppd status --root DIR [--json]
    ppd ui --root DIR [--port 4200] [--background | --stop]
    ppd serve [--config FILE] [--root DIR] [--set key=value]...
    ppd config show [--config FILE] [--set key=value]...

Prefect's database and result records live under ``<root>/.prefect``. Unless ``PREFECT_API_URL`` points at
a server, commands use the root's local server: the one ``ppd ui`` started, or one the first command started
in the background, which stops itself after ``run.server_idle_seconds`` (default 300) unused. Its URL is
kept in ``<root>/.prefect/api_url`` (see :mod:`flows.server`); ``run.server_idle_seconds=0`` runs each
command on Prefect's temporary server instead (about 10 s per command).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.generate import generate_command
from flows.options import ConfigOpt, SetOpt, _absolute_root, _fail, _resolve, err, out, record_run_config
from ppd_core.config import config_to_yaml
from ppd_core.console import quiet_handlers, quiet_libraries
from ppd_core.errors import PPDError

app = typer.Typer(
    help="Personalized preference fine-tuning (PPD) of text-to-image diffusion models: the pipeline CLI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def configure_prefect(root: Path, idle: float) -> None:
    """Point Prefect at the run root: its database and result records live under it.

    Unless ``PREFECT_API_URL`` names a server, the root's own server is used: the one ``ppd ui`` or an
    earlier command started, else one started now in the background that stops itself after
    ``idle`` seconds unused (:func:`flows.server.ensure_server`); with that set to 0, a live
    server is still used and otherwise Prefect's temporary server (:func:`start_embedded_api`).
    ``idle`` is ``run.server_idle_seconds``.
    Must run before prefect is imported (Prefect reads its settings at import)."""
    from flows import server

    home = root / ".prefect"
    (home / "results").mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):
        try:
            if idle > 0:
                url, started = server.ensure_server(root, idle)
                if started:
                    err.print(
                        f"Prefect API: started a background server for this root ({url}); it stops after "
                        f"{idle:g} s unused (run.server_idle_seconds=0: a temporary server per command instead)",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
            else:
                url = server.live_api_url(root)
                if url:
                    server.register_client(root)
        except PPDError as e:
            _fail(e)
        if url:
            os.environ["PREFECT_API_URL"] = url
        os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server's start is slow on a loaded machine (2 busy cores: > 20 s, Prefect's default)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def start_embedded_api(root: Path) -> None:
    """In the embedded mode, start Prefect's temporary API server now, holding the root's database lock
    (:attr:`RunLayout.prefect_db_lock`) until it answers. The server creates or migrates
    ``<root>/.prefect/prefect.db`` as it starts; two ``ppd`` commands starting together on a new root
    would otherwise migrate it at once and one would crash (``duplicate column name``). The flow
    then talks to this server (Prefect keeps one per process). Call after :func:`configure_prefect`."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from ppd_core import locks
    from ppd_core.layout import RunLayout

    lock = RunLayout(root).prefect_db_lock

    def waiting(_: str) -> None:
        err.print(
            f"another ppd command is opening (creating or migrating) this root's Prefect database; waiting ({lock})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    with locks.hold(lock, on_wait=waiting, what="the run root's Prefect database"):
        SubprocessASGIServer().start()


def _print_report(report: list[dict], root: str) -> None:
    """The run's story: one line per stage (computed or cached, seconds, the one count that matters), then
    where the outputs and the report are, and the report's headline in words."""
    from ppd_core import pipeline

    table = Table(title="ppd run", show_lines=False)
    for col in ("stage", "state", "seconds", "result"):
        table.add_column(col, overflow="fold")
    for r in report:
        result = pipeline.stage(r["name"]).describe(r["counts"])
        if r.get("partitions"):
            days = r["partitions"]
            result = f"{len(days['computed'])} of {days['days']} days ingested now; {result}"
        if r.get("joint_with"):
            result = f"{result} (one launch with {', '.join(r['joint_with'])})"
        table.add_row(r["name"], "cached" if r["cached"] else "computed", f"{r['seconds']:.1f}", result)
    out.print(table)
    out.print(
        f"Outputs are under {root} (each stage: <root>/<stage>/<fingerprint>/manifest.json).",
        markup=False,
        soft_wrap=True,
    )
    for r in report:
        if r["name"] == "evaluate" and r["counts"].get("report"):
            directory = Path(r["output_dir"])
            out.print(
                f"Report: {directory / r['counts']['report']}", markup=False, style="bold", soft_wrap=True
            )
            _print_headline(directory)


def _print_headline(evaluate_dir: Path) -> None:
    """The report's first screen, in the console: the headline sentences and how many targets were met."""
    from ppd_core.evaluate.report import headline_sentences

    try:
        summary = json.loads((evaluate_dir / "summary.json").read_text())
        shots = json.loads((evaluate_dir / "manifest.json").read_text())["config"]["fewshot"]["shots"]
    except (OSError, KeyError, ValueError):
        return
    for sentence in headline_sentences(summary["headline"], shots):
        out.print(sentence, markup=False, highlight=False, soft_wrap=True)
    decided = [t for t in summary["targets"] if t["met"] is not None]
    missed = [t["target"] for t in decided if not t["met"]]
    out.print(f"Targets met: {len(decided) - len(missed)} of {len(decided)}.", markup=False)
    for target in missed:
        out.print(f"  not met: {target}", markup=False, highlight=False)


@app.command()
def run(
    config: ConfigOpt = None,
    root: Annotated[
        Path | None,
        typer.Option(
            "--root", help="Run root: all outputs, caches and the local Prefect database.", show_default=False
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Pick-a-Pic v2 Parquet (directory, glob or fsspec URL) instead of the synthetic world.",
            show_default=False,
        ),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help="Comma-separated stages (upstream stages are added and reused when cached). Default: all.",
            show_default=False,
        ),
    ] = None,
    partitioned: Annotated[
        bool,
        typer.Option(
            "--partitioned",
            help="Ingest one creation day at a time (only days missing or failed, the partitions of ppd backfill) "
            "and run the later stages over the union of the complete days.",
        ),
    ] = False,
    start: Annotated[
        str | None,
        typer.Option(
            "--start", help="With --partitioned: first creation day, YYYY-MM-DD.", show_default=False
        ),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option(
            "--end", help="With --partitioned: last creation day (inclusive), YYYY-MM-DD.", show_default=False
        ),
    ] = None,
    set_: SetOpt = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object (per stage: name, output dir, cached, seconds, counts)."
        ),
    ] = False,
) -> None:
    """Run pipeline stages through Prefect; completed stages are served from cache."""
    extra = []
    if root is not None:
        extra.append(f"run.root={root.expanduser().resolve()}")
    if source is not None:
        extra.append(f"ingest.source={json.dumps(source)}")
    try:
        extra += _window_overrides(partitioned, start, end)
        cfg = _absolute_root(_resolve(config, set_, extra))
        from ppd_core import pipeline

        stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        pipeline.expand(stage_list, cfg)  # validate names before starting Prefect
        pipeline.preflight(cfg)
        record_run_config(cfg)  # later commands on this root (generate, backfill, serve) start from it
    except PPDError as e:
        _fail(e)
    root_path = Path(cfg.run.root)
    configure_prefect(root_path, cfg.run.server_idle_seconds)
    start_embedded_api(root_path)
    from flows.pipeline import pipeline_flow  # imports prefect: after configure_prefect
    from flows.runs import reap_dead_runs

    reap_dead_runs(root_path)

    quiet_handlers()

    try:
        report = pipeline_flow(cfg, stage_list)
    except PPDError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps({"root": str(root_path), "stages": report}, default=str) + "\n")
    else:
        _print_report(report, str(root_path))


def _window_overrides(partitioned: bool, start: str | None, end: str | None) -> list[str]:
    """``--partitioned --start --end`` as config overrides; a date or a range mistake is a one-line error."""
    from ppd_core.data.partitions import parse_day

    if not partitioned:
        if start is not None or end is not None:
            raise PPDError("--start and --end choose the days of a partitioned run: add --partitioned")
        return []
    days = {name: parse_day(value, name) for name, value in (("--start", start), ("--end", end)) if value}
    if len(days) == 2 and days["--start"] > days["--end"]:
        raise PPDError(f"--start {start} is after --end {end}")
    overrides = ["ingest.partitioned=true"]
    if start:
        overrides.append(f"ingest.start={json.dumps(start)}")
    if end:
        overrides.append(f"ingest.end={json.dumps(end)}")
    return overrides


RootOpt = Annotated[
    Path,
    typer.Option(
        "--root", help="Run root: all outputs, caches and the local Prefect database.", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _brief(value) -> str:
    return "" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def _print_rows(title: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(_brief(r.get(c)) for c in columns))
    out.print(table)


PARTITION_COLUMNS = ("partition", "state", "rows", "quarantined", "seconds", "error")


@app.command()
def backfill(
    root: RootOpt,
    source: Annotated[
        str, typer.Option("--source", help="Pick-a-Pic v2 Parquet: directory, glob or fsspec URL.")
    ],
    start: Annotated[str, typer.Option("--start", help="First creation day, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--end", help="Last creation day (inclusive), YYYY-MM-DD.")],
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute complete days too.")] = False,
    lock_timeout: Annotated[
        float | None,
        typer.Option(
            "--lock-timeout", help="Seconds to wait for a day another process holds (default: wait)."
        ),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help="Then run these stages (comma-separated, upstream added) over the union of the range's days, "
            "as ppd run --partitioned --start --end does.",
            show_default=False,
        ),
    ] = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest the source one creation day at a time: only days missing or failed, unless --force."""
    extra = [f"run.root={root.expanduser().resolve()}", f"ingest.source={json.dumps(source)}"]
    try:
        extra += _window_overrides(True, start, end)
        cfg = _absolute_root(_resolve(config, set_, extra, root=root.expanduser().resolve()))
        from ppd_core import pipeline

        stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        if stage_list:
            pipeline.expand(stage_list, cfg)  # validate names before starting Prefect
        pipeline.preflight(cfg)
        if stage_list:
            record_run_config(cfg)  # the downstream outputs are this config's (ppd generate finds them)
    except PPDError as e:
        _fail(e)
    configure_prefect(Path(cfg.run.root), cfg.run.server_idle_seconds)
    start_embedded_api(Path(cfg.run.root))
    from flows.backfill import run_backfill  # imports prefect: after configure_prefect
    from flows.runs import reap_dead_runs

    reap_dead_runs(cfg.run.root)

    try:
        report = run_backfill(cfg, start, end, force=force, lock_timeout=lock_timeout)
        if report["ok"] and stage_list:
            from flows.pipeline import pipeline_flow

            quiet_handlers()
            report["stages"] = pipeline_flow(cfg, stage_list)
    except PPDError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps({"root": cfg.run.root, "source": source, **report}, default=str) + "\n")
    else:
        _print_rows(f"ppd backfill {start}..{end}", report["partitions"], ("submitted", *PARTITION_COLUMNS))
        if not report["partitions"]:
            out.print(f"{source} has no rows created between {start} and {end}.")
        if report.get("stages"):
            _print_report(report["stages"], cfg.run.root)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def status(root: RootOpt, as_json: JsonOpt = False) -> None:
    """Per-stage table (latest task run of each stage, from the Prefect API) and the partition table."""
    from ppd_core.layout import check_run_root

    try:
        root = check_run_root(root)
    except PPDError as e:
        _fail(e)
    if not root.is_dir():
        _fail(PPDError(f"{root}: no such run root"))
    try:  # the root's recorded config (else the default preset), PPD_* variables included
        idle = _resolve(None, None, root=root).run.server_idle_seconds
    except PPDError:  # a record this code no longer reads does not stop a status: the default applies
        from ppd_core.config import RunConfig

        idle = RunConfig.model_fields["server_idle_seconds"].default
    configure_prefect(root, idle)
    start_embedded_api(root)
    from flows.status import collect_status  # imports prefect: after configure_prefect

    report = {
        "root": str(root),
        "api": os.environ.get("PREFECT_API_URL") or "embedded",
        **collect_status(root),
    }
    if as_json:
        sys.stdout.write(json.dumps(report, default=str) + "\n")
        return
    for r in [*report["stages"], *report["flow_runs"]]:
        r["started"] = (r["start"] or "")[:19].replace("T", " ")
    for r in report["stages"]:
        r["counts_brief"] = ", ".join(
            f"{k}={v}"
            for k, v in r["counts"].items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        )[:160]
    _print_rows("stages", report["stages"], ("name", "state", "started", "seconds", "counts_brief"))
    _print_rows("flow runs", report["flow_runs"][:10], ("name", "flow", "state", "started", "seconds", "id"))
    if report["partitions"]:
        _print_rows("partitions", report["partitions"], PARTITION_COLUMNS)
    out.print(f"Prefect API: {report['api']}")


@app.command()
def ui(
    root: RootOpt,
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 4200,
    background: Annotated[
        bool, typer.Option("--background", help="Leave the server running and return (stop with --stop).")
    ] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the server started for this root.")] = False,
) -> None:
    """Start a local Prefect server and dashboard (SQLite under <root>/.prefect); later CLI calls use it."""
    from flows import server
    from ppd_core.layout import check_run_root

    try:
        root = check_run_root(root)
    except PPDError as e:
        _fail(e)
    if stop:
        out.print(server.stop_server(root), markup=False, highlight=False, soft_wrap=True)
        return
    try:
        url = server.live_api_url(root)
    except PPDError as e:
        _fail(e)
    if url:
        out.print(f"Prefect dashboard already running: {server.dashboard_url(url)}")
        idle = (server.recorded_server(root, url) or {}).get("idle_seconds")
        if idle:
            out.print(
                f"(started in the background by an earlier ppd command: it stops after {idle:g} s unused; "
                f"for one that stays, `ppd ui --stop --root {root}` and then `ppd ui --root {root}`)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return
    try:
        proc, api = server.start_server(root, port)
    except PPDError as e:
        _fail(e)
    out.print(
        f"Prefect dashboard: {server.dashboard_url(api)}  (API {api}; log {root / '.prefect' / server.LOG_FILE})"
    )
    if background:
        out.print(f"Running in the background; stop it with: ppd ui --stop --root {root}")
        return
    server.wait_foreground(root, proc)


@app.command()
def serve(
    config: ConfigOpt = None,
    root: Annotated[
        Path | None, typer.Option("--root", help="Run root of the scheduled runs.", show_default=False)
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Port of the server started when none answers.")] = 4200,
    set_: SetOpt = None,
) -> None:
    """Serve the deployments of deploy/prefect.yaml with their cron schedules (needs a Prefect server:
    the one `ppd ui` started for this root, PREFECT_API_URL, or one started here)."""
    from flows import server

    extra = [f"run.root={root.expanduser().resolve()}"] if root is not None else []
    try:
        cfg = _absolute_root(
            _resolve(config, set_, extra, root=root.expanduser().resolve() if root else None)
        )
    except PPDError as e:
        _fail(e)
    root_path = Path(cfg.run.root)
    configure_prefect(root_path, cfg.run.server_idle_seconds)
    started = None
    if not os.environ.get("PREFECT_API_URL"):  # the embedded API has no scheduler
        try:
            started, api = server.start_server(root_path, port)
        except PPDError as e:
            _fail(e)
        os.environ["PREFECT_API_URL"] = api
    out.print(f"Prefect dashboard: {server.dashboard_url(os.environ['PREFECT_API_URL'])}")
    from flows.serve import serve as serve_deployments  # imports prefect: after configure_prefect

    try:
        serve_deployments(cfg)
    except PPDError as e:
        _fail(e)
    finally:
        if started is not None:
            server.stop_process(started.pid)
            server.forget(root_path)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved configuration (defaults < preset < PPD_* env < --set)."""
    try:
        cfg = _resolve(config, set_)
    except PPDError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(cfg.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(config_to_yaml(cfg))


@config_app.command("reference")
def config_reference(
    write: Annotated[
        Path | None,
        typer.Option(
            "--write", help="Replace the table between the config-reference markers of this Markdown file."
        ),
    ] = None,
) -> None:
    """Print a Markdown table of every config key, its default and meaning (the README's table)."""
    from ppd_core.config import reference_markdown

    table = reference_markdown()
    if write is None:
        sys.stdout.write(table + "\n")
        return
    text = write.read_text()
    start, end = "<!-- config-reference:start", "<!-- config-reference:end -->"
    if start not in text or end not in text:
        _fail(PPDError(f"{write}: no config-reference markers"))
    head, rest = text.split(start, 1)
    marker_line, _ = rest.split("\n", 1)
    tail = rest.split(end, 1)[1]
    write.write_text(f"{head}{start}{marker_line}\n{table}\n{end}{tail}")


app.command(name="generate")(generate_command)


@app.callback()
def _quiet() -> None:
    """Before any command: silence library notices that mean nothing to a user (ppd_core.console)."""
    quiet_libraries()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

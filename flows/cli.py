"""The ``ppd`` command line (DESIGN.md section 8). Thin: parse, resolve the config, call a flow.

Spellings are a contract used by scripts and schedules::

    ppd run [--config FILE] [--root DIR] [--source PATH_OR_URL] [--stages a,b,...] [--set key=value]... [--json]
    ppd config show [--config FILE] [--set key=value]...

Prefect runs in its embedded mode (a temporary local API, no server to start) with its database and
result records under ``<root>/.prefect`` unless ``PREFECT_API_URL`` points at a server.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ppd_core.config import PPDConfig, config_to_yaml, load_config
from ppd_core.errors import PPDError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = REPO_ROOT / "configs" / "toy.yaml"

app = typer.Typer(
    help="Personalized preference fine-tuning (PPD) of text-to-image diffusion models: the pipeline CLI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

err = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML preset (default: $PPD_CONFIG, else configs/toy.yaml).",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Dotted override, repeatable: --set fewshot.seed=3 (wins over file and PPD_* env).",
        show_default=False,
    ),
]


def _resolve(config: Path | None, sets: list[str] | None, extra: list[str] = ()) -> PPDConfig:
    path = config or (Path(os.environ["PPD_CONFIG"]) if os.environ.get("PPD_CONFIG") else None)
    if path is None and DEFAULT_PRESET.is_file():
        path = DEFAULT_PRESET
    return load_config(path, [*(sets or []), *extra])


def _fail(e: Exception, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(code)


def configure_prefect(root: Path) -> None:
    """Point Prefect at the run root: embedded database and result records live under it.

    Must run before prefect is imported (Prefect reads its settings at import)."""
    home = root / ".prefect"
    (home / "results").mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _print_report(report: list[dict], root: str) -> None:
    table = Table(title="ppd run", show_lines=False)
    for col in ("stage", "state", "seconds", "output", "counts"):
        table.add_column(col, overflow="fold")
    for r in report:
        counts = r["counts"]
        brief = ", ".join(
            f"{k}={v}" for k, v in counts.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        table.add_row(
            r["name"],
            "cached" if r["cached"] else "computed",
            f"{r['seconds']:.1f}",
            r["output_dir"],
            brief[:200],
        )
    out.print(table)
    out.print(f"Outputs are under [bold]{root}[/] (each stage: <root>/<stage>/<fingerprint>/manifest.json).")


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
        cfg = _resolve(config, set_, extra)
        cfg = cfg.model_copy(
            update={"run": cfg.run.model_copy(update={"root": str(Path(cfg.run.root).resolve())})}
        )
        from ppd_core import pipeline

        stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        pipeline.expand(stage_list, cfg)  # validate names before starting Prefect
        pipeline.preflight(cfg)
    except PPDError as e:
        _fail(e)
    root_path = Path(cfg.run.root)
    configure_prefect(root_path)
    from flows.data import data_flow  # imports prefect: after configure_prefect

    try:
        report = data_flow(cfg, stage_list)
    except PPDError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps({"root": str(root_path), "stages": report}, default=str) + "\n")
    else:
        _print_report(report, str(root_path))


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


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

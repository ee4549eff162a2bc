"""What every ``ppd`` command shares: the console, the ``--config`` / ``--set`` options, config resolution and
the one-line error exit. flows/cli.py and the command modules it registers (flows/generate.py) import it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ppd_core.config import PPDConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = REPO_ROOT / "configs" / "toy.yaml"

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
    """Say a user-facing error in one message: the text as is (no rich markup, so ``[us]`` or a path with
    ``[/x]`` survives) and unwrapped, then exit ``code``."""
    err.print("error:", style="bold red", end=" ")
    err.print(str(e), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _absolute_root(cfg: PPDConfig) -> PPDConfig:
    """The config with ``run.root`` absolute; a root that exists as a file is an InputError."""
    from ppd_core.layout import check_run_root

    root = check_run_root(cfg.run.root)
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"root": str(root)})})

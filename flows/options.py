"""What every ``ppd`` command shares: the console, the ``--config`` / ``--set`` options, config resolution and
the one-line error exit. flows/cli.py and the command modules it registers (flows/generate.py) import it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ppd_core.config import PPDConfig, load_config
from ppd_core.errors import PPDError
from ppd_core.layout import RunLayout

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


def _resolve(
    config: Path | None, sets: list[str] | None, extra: list[str] = (), root: Path | None = None
) -> PPDConfig:
    """The config of a command: ``--config`` (else $PPD_CONFIG), else, given the ``root`` of an earlier
    ``ppd run``, the config that run recorded, else configs/toy.yaml; then PPD_* variables and ``--set``.
    ``ppd run`` itself passes no ``root``: what its command line says is what runs (and is recorded)."""
    path = config or (Path(os.environ["PPD_CONFIG"]) if os.environ.get("PPD_CONFIG") else None)
    recorded = RunLayout(root).run_config if root is not None else None
    if path is None and recorded is not None and recorded.is_file():
        path = recorded
    elif path is None and DEFAULT_PRESET.is_file():
        path = DEFAULT_PRESET
    cfg = load_config(path, [*(sets or []), *extra])
    if recorded is not None and recorded.is_file() and path != recorded:
        _say_if_different(recorded, cfg, f"{root} was run with another config", f"using {path}")
    return cfg


def _say_if_different(recorded: Path, cfg: PPDConfig, what: str, consequence: str) -> None:
    """One line when ``cfg`` differs from the config recorded at ``recorded`` (an unreadable record counts)."""
    try:
        differs = config_differences(load_config(recorded), cfg)
    except PPDError:
        differs = ["(unreadable record)"]
    if differs:
        shown = ", ".join(differs[:6]) + (", ..." if len(differs) > 6 else "")
        err.print(f"note: {what} (differs in {shown}); {consequence}", markup=False, soft_wrap=True)


def config_differences(a: PPDConfig, b: PPDConfig) -> list[str]:
    """Dotted keys whose values differ between two configs (``run.root`` excluded)."""

    def flat(data, prefix=""):
        if isinstance(data, dict):
            for k, v in data.items():
                yield from flat(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], data

    left, right = dict(flat(a.model_dump(mode="json"))), dict(flat(b.model_dump(mode="json")))
    return [k for k in sorted(set(left) | set(right)) if k != "run.root" and left.get(k) != right.get(k)]


def record_run_config(cfg: PPDConfig) -> None:
    """Write the resolved config to ``<root>/run_config.yaml`` (atomically) for later commands on the root;
    say in one line when it replaces a different one."""
    from ppd_core.config import config_to_yaml
    from ppd_core.manifest import atomic_write_bytes

    path = RunLayout(cfg.run.root).run_config
    if path.is_file():
        _say_if_different(
            path,
            cfg,
            "this root was last run with another config",
            "both runs' outputs are kept, and later commands on the root now use this run's config",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, config_to_yaml(cfg).encode())


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

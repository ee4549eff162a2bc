"""``ppd generate``: images from a trained run (or the base model) for one user, prompts and seeds.

    ppd generate --root DIR --model {ppd,dpo,sft,base,ppd_true,ppd_shots} (--shots FILE | --user ID) --prompts FILE
                 [--seeds N] [--scale X] [--guidance G] [--user-guidance G] [--steps N] --out DIR

The library logic is :mod:`ppd_core.personalize`; this module parses options and prints the result.
``--out`` must be new, empty, or an earlier output of this command (its manifest lists every file there), which is replaced whole; any other directory is refused and left untouched.
Registered on the ``ppd`` app by flows/cli.py; needs no Prefect.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.options import ConfigOpt, SetOpt, _absolute_root, _fail, _resolve, out
from ppd_core.errors import PPDError


def generate_command(
    root: Annotated[Path, typer.Option("--root", help="Run root of a completed `ppd run`.")],
    model: Annotated[str, typer.Option("--model", help="base, ppd, dpo, sft, ppd_true or ppd_shots.")],
    prompts: Annotated[Path, typer.Option("--prompts", help="Text file, one prompt per line.")],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output directory (images + manifest.json): new, empty, or an earlier output, which is replaced.",
        ),
    ],
    shots: Annotated[
        Path | None,
        typer.Option(
            "--shots", help="Parquet of one user's labelled pairs, Pick-a-Pic v2 schema with images."
        ),
    ] = None,
    user: Annotated[
        int | None, typer.Option("--user", help="A user id of the run's dataset (instead of --shots).")
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt (0..N-1).", min=1)] = 1,
    scale: Annotated[
        float | None, typer.Option("--scale", help="Adapter scale (default evaluate.scale).")
    ] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="Text guidance.")] = None,
    user_guidance: Annotated[float | None, typer.Option("--user-guidance", help="User-CFG.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Generate images for one user with a trained model; same prompt and seed give the same file name."""
    from ppd_core.personalize import generate_for_user, read_prompts

    try:
        resolved_root = root.expanduser().resolve()
        cfg = _absolute_root(_resolve(config, set_, [f"run.root={resolved_root}"], root=resolved_root))
        result = generate_for_user(
            cfg,
            model,
            read_prompts(prompts),
            out_dir,
            shots=shots,
            user=user,
            seeds=seeds,
            settings={"scale": scale, "guidance": guidance, "user_guidance": user_guidance, "steps": steps},
        )
    except PPDError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        out.print(f"{result['images']} images -> [bold]{result['directory']}[/]")

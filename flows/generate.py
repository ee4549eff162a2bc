"""``ppd generate``: images from a trained run (or the base model) for one user, prompts and seeds.

    ppd generate --root DIR --model {ppd,dpo,sft,base,ppd_true,ppd_shots} (--shots FILE | --user ID) --prompts FILE
                 [--seeds N] [--scale X] [--guidance G] [--user-guidance G] [--steps N] --out DIR

Nothing is trained or embedded in the run root: the run's stages must be complete for the same config
(``ppd run`` first). ``--out`` must be new, empty, or an earlier output of this command (its manifest lists
every file there), which is replaced whole; any other directory is refused and left untouched.
Registered on the ``ppd`` app by flows/cli.py; needs no Prefect.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.options import ConfigOpt, SetOpt, _absolute_root, _fail, _resolve, out
from ppd_core.errors import InputError, PPDError


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
    from dataclasses import replace

    from ppd_core import pipeline
    from ppd_core.evaluate import generate as gen

    try:
        cfg = _absolute_root(
            _resolve(
                config, set_, [f"run.root={root.expanduser().resolve()}"], root=root.expanduser().resolve()
            )
        )
        if model not in gen.MODELS:
            raise InputError(f"--model {model!r}: choose one of {', '.join(gen.MODELS)}")
        if model != "base" and (shots is None) == (user is None):
            raise InputError("give the user as exactly one of --shots FILE or --user ID")
        out_dir = gen.check_out_dir(out_dir)  # before any work: refuse a directory we would destroy
        if not prompts.is_file():
            raise InputError(f"--prompts {prompts}: no such file")
        prompt_list = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        if not prompt_list:
            raise InputError(f"--prompts {prompts}: no prompts (one per line)")
        wanted = ["embed", "fewshot", *pipeline.backbone_stages(cfg)] + (
            [gen.TRAIN_STAGE[model]] if model != "base" else []
        )
        dirs = pipeline.locate(cfg, wanted)
        embedder = gen.embedder_for(cfg, model)
        if model == "base":
            cond = None
        elif shots is not None:
            cond = gen.new_user(cfg, dirs, embedder, shots)
        else:
            cond = gen.known_user(
                dirs["embed"], embedder, user, average=int(user) in gen.averaged_users(cfg, dirs["fewshot"])
            )
        settings = gen.Settings.from_config(cfg)
        updates = {"scale": scale, "guidance": guidance, "user_guidance": user_guidance, "steps": steps}
        settings = replace(settings, **{k: v for k, v in updates.items() if v is not None})
        models = gen.ModelSet.load(cfg, dirs, [model])
        index, plist, seed_list = gen.request_grid(prompt_list, seeds)
        images = models.generate(model, plist, seed_list, None if cond is None else cond.embedding, settings)
        request = {
            "model": model,
            "run_root": str(cfg.run.root),
            "model_dir": str(dirs.get(gen.TRAIN_STAGE.get(model, ""), dirs.get("pretrain", ""))),
            "user_id": None if cond is None else cond.user_id,
            "shot_set_id": None if cond is None else cond.shot_set_id,
            "shots_file": None if shots is None else str(shots.resolve()),
            "prompts": prompt_list,
            "seeds_per_prompt": seeds,
            "settings": settings.__dict__,
        }
        result = gen.write_images(out_dir, images, index, seed_list, request)
    except PPDError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        out.print(f"{result['images']} images -> [bold]{result['directory']}[/]")

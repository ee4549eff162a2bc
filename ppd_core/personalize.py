"""``ppd generate``'s library: images of one model for one user (a user of the run's dataset, a new user's
labelled pairs, or none for the base model), for given prompts and seeds, from a completed run.

Nothing is trained or embedded in the run root: the run's stages must be complete for the config (found
with :func:`ppd_core.pipeline.locate`, which names every missing stage at once). A new user's pairs go
through the pipeline's own ingestion and the run's embedder. File names depend only on the prompt index and
seed, so the outputs of different models pair up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ppd_core import pipeline
from ppd_core.config import PPDConfig
from ppd_core.errors import InputError
from ppd_core.evaluate import generate as gen


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def generate_for_user(
    cfg: PPDConfig,
    model: str,
    prompts: Sequence[str],
    out_dir: Path,
    *,
    shots: Path | None = None,
    user: int | None = None,
    seeds: int = 1,
    settings: Mapping[str, float | int | None] | None = None,
) -> dict:
    """Write ``seeds`` images per prompt of ``model`` for the user (``shots`` file or ``user`` id; neither
    for ``base``) into ``out_dir`` with a manifest; returns the directory, image count and digest.
    ``settings``: sampler overrides (scale, guidance, user_guidance, steps); None values keep the config's."""
    if model not in gen.MODELS:
        raise InputError(f"--model {model!r}: choose one of {', '.join(gen.MODELS)}")
    if model != "base" and (shots is None) == (user is None):
        raise InputError("give the user as exactly one of --shots FILE or --user ID")
    out_dir = gen.check_out_dir(out_dir)  # before any work: refuse a directory we would destroy
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
    chosen = replace(
        gen.Settings.from_config(cfg), **{k: v for k, v in (settings or {}).items() if v is not None}
    )
    models = gen.ModelSet.load(cfg, dirs, [model])
    index, plist, seed_list = gen.request_grid(list(prompts), seeds)
    images = models.generate(model, plist, seed_list, None if cond is None else cond.embedding, chosen)
    request = {
        "model": model,
        "run_root": str(cfg.run.root),
        "model_dir": str(dirs.get(gen.TRAIN_STAGE.get(model, ""), dirs.get("pretrain", ""))),
        "user_id": None if cond is None else cond.user_id,
        "shot_set_id": None if cond is None else cond.shot_set_id,
        "shots_file": None if shots is None else str(Path(shots).resolve()),
        "prompts": list(prompts),
        "seeds_per_prompt": seeds,
        "settings": chosen.__dict__,
    }
    return gen.write_images(out_dir, images, index, seed_list, request)

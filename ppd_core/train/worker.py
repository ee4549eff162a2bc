"""One training rank: ``python -m ppd_core.train.worker --spec <run>/train_spec.json``.

Started by :mod:`ppd_core.train.launch` (deepspeed launcher or torchrun) once per rank. Every run goes
through ``deepspeed.initialize`` over the trainable module only (the user adapter); the frozen backbone
stays outside the engine, and the DPO reference is the same network with the user branch off.

Per step (P pairs per rank): x0 of winners and losers from the latent cache, one noise tensor and one
timestep per pair shared by both images, user tokens from the pair's conditioning shot set (ppd) or
from one constant embedding (dpo, sft), user-embedding dropout to the null user, the policy and
reference per-sample MSE, the loss, ``engine.backward``/``engine.step``. Noise, timesteps and dropout
come from a generator seeded by (seed, step, rank), and the pair order is a pure function of the
step, so ``resume: latest`` after ``kill -9`` continues exactly: rank 0 first drops what the killed attempt
logged after the resumed checkpoint (``metrics.jsonl`` and ``validation.jsonl`` lines past its step,
TensorBoard events through ``purge_step``), so every step is in the logs once.

A rank ends itself when the process that launched training is gone (:func:`launch.exit_with_parent`), and
holds the run's ranks lock while it runs (:func:`launch.hold_as_rank`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ppd_core.config import BETA_DPO_DEFAULTS, PPDConfig
from ppd_core.data.fewshot import read_fewshot
from ppd_core.embed.extract import read_embeddings
from ppd_core.manifest import atomic_write_json, truncate_jsonl
from ppd_core.models.adapter import embedding_dropout
from ppd_core.models.factory import load_backbone
from ppd_core.train import checkpoint, launch
from ppd_core.train.cache import LatentCache
from ppd_core.train.losses import diffusion_dpo_loss, per_sample_mse, sft_loss
from ppd_core.train.sampler import PairSampler

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIGS = REPO / "deploy" / "deepspeed"


def ds_config(cfg: PPDConfig, pairs_per_rank: int) -> dict:
    """deploy/deepspeed/zero<stage>.json with the "auto" values filled from the train config."""
    t = cfg.train
    conf = json.loads((DEEPSPEED_CONFIGS / f"zero{t.zero_stage}.json").read_text())
    conf["train_micro_batch_size_per_gpu"] = pairs_per_rank
    conf["optimizer"]["params"].update(lr=t.lr, weight_decay=t.weight_decay)
    conf["bf16"]["enabled"] = t.precision == "bf16"
    conf["fp16"]["enabled"] = t.precision == "fp16"
    conf["scheduler"] = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": t.lr,
            "warmup_num_steps": max(t.warmup_steps, 1),
            "warmup_type": "linear",
        },
    }
    return conf


class TrainData:
    """Training pairs with their x0, text states and conditioning embeddings."""

    def __init__(self, spec: dict, trainer: str, device: torch.device):
        dirs = {k: Path(v) for k, v in spec["dirs"].items()}
        pairs = read_fewshot(dirs["fewshot"], "train_pairs")
        self.pairs = pairs.to_pylist()
        if not self.pairs:
            raise RuntimeError("no training pairs")
        self.cache = LatentCache(dirs["cache_latents"], device).preload()
        table, emb = read_embeddings(dirs["embed"], spec["embedder"])
        self.embedding_shape = tuple(emb.shape[1:])
        self.by_set = {sid: i for i, sid in enumerate(table.column("shot_set_id").to_pylist())}
        self.embeddings = torch.from_numpy(emb).to(device)  # (S, *shape)
        self.user_first_set = {}
        for sid, uid in zip(
            table.column("shot_set_id").to_pylist(), table.column("user_id").to_pylist(), strict=True
        ):
            self.user_first_set.setdefault(uid, sid)
        self.trainer = trainer
        self.device = device

    def condition(self, rows: list[dict], shot_set_ids: list[str] | None = None) -> torch.Tensor:
        """(P, *embedding_shape): the conditioning shot set's embedding (ppd) or the constant zero embedding."""
        if self.trainer != "ppd":
            return torch.zeros((len(rows), *self.embedding_shape), device=self.device)
        ids = shot_set_ids or [r["shot_set_id"] for r in rows]
        return self.embeddings[torch.as_tensor([self.by_set[s] for s in ids], device=self.device)]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.pairs[i] for i in indices]
        x0 = self.cache.get(
            "image", [r["winner_uid"] for r in rows] + [r["loser_uid"] for r in rows]
        )  # (2P, C, H, W)
        text = self.cache.get("text", [r["caption"] for r in rows] * 2)  # (2P, T, D)
        return x0, text, self.condition(rows)


def pair_losses(backbone, adapter, trainer, x0, text, emb, beta, generator, dropout, scale):
    """One forward of the objective on P pairs; returns (loss, metrics)."""
    p = emb.shape[0]
    noise = torch.randn((p, *x0.shape[1:]), generator=generator, device=x0.device).repeat(
        2, 1, 1, 1
    )  # shared per pair
    t = backbone.sample_timesteps(p, generator=generator)
    t = t.repeat(2) if t.ndim == 1 else t.repeat(2, *([1] * (t.ndim - 1)))
    null = embedding_dropout(p, dropout, generator=generator).to(x0.device)
    x_t = backbone.add_noise(x0, noise, t)
    target = backbone.target(x0, noise, t)
    if trainer == "sft":  # winners only
        tokens, user_scale = adapter.condition(emb, scale, null)
        pred = backbone.denoise(x_t[:p], t[:p], text[:p], tokens, user_scale)
        loss = sft_loss(per_sample_mse(pred, target[:p]))
        return loss, {"loss": float(loss.detach())}
    tokens, user_scale = adapter.condition(emb.repeat(2, *([1] * (emb.ndim - 1))), scale, null.repeat(2))
    model_mse = per_sample_mse(backbone.denoise(x_t, t, text, tokens, user_scale), target)
    with torch.no_grad():
        ref_mse = per_sample_mse(backbone.denoise(x_t, t, text), target)  # same network, branch off
    out = diffusion_dpo_loss(model_mse, ref_mse, beta)
    return out.loss, out.metrics()


@torch.no_grad()
def heldout_accuracy(
    backbone, adapter, data: TrainData, eval_rows: list[dict], trainer, beta, seed, scale
) -> float:
    """Implicit accuracy on held-out pairs of seen users, fixed noise and timesteps (comparable across steps)."""
    if not eval_rows:
        return float("nan")
    g = torch.Generator(device=data.device).manual_seed(seed + 7919)
    x0 = data.cache.get("image", [r["winner_uid"] for r in eval_rows] + [r["loser_uid"] for r in eval_rows])
    text = data.cache.get("text", [r["caption"] for r in eval_rows] * 2)
    sets = [data.user_first_set[r["user_id"]] for r in eval_rows]
    emb = data.condition(eval_rows, sets)
    _, metrics = pair_losses(
        backbone, adapter, "ppd" if trainer == "sft" else trainer, x0, text, emb, beta, g, 0.0, scale
    )
    return metrics["implicit_acc"]


@torch.no_grad()
def validation_grid(
    backbone,
    adapter,
    data: TrainData,
    eval_rows: list[dict],
    cfg: PPDConfig,
    step: int,
    run_dir: Path,
    writer,
):
    """Rows: the base model (branch off), then one row per validation user; columns: prompts; fixed seeds.

    Written to ``validation/step-<step>.png`` and to TensorBoard (one image per row, so rows never
    collapse into one tile)."""
    from ppd_core.models.grids import save_grid, to_uint8
    from ppd_core.models.sampling import sample

    t = cfg.train
    users = sorted({r["user_id"] for r in eval_rows})[: t.validation_users]
    prompts = sorted({r["caption"] for r in eval_rows if r["caption"]})[: t.validation_prompts]
    if not users or not prompts:
        return
    seeds = list(range(len(prompts)))
    rows = [sample(backbone, prompts, seeds)]  # base model
    for user in users:
        sets = [data.user_first_set[user]] * len(prompts)
        emb = data.condition([{}] * len(prompts), sets)
        rows.append(
            sample(backbone, prompts, seeds, user_tokens=adapter.tokens(emb), user_scale=cfg.adapter.scale)
        )
    images = to_uint8(torch.cat(rows))  # ((1 + U) * P, H, W, 3)
    scale = max(1, 64 // images.shape[1])
    save_grid(images, len(rows), len(prompts), run_dir / "validation" / f"step-{step:08d}.png", scale=scale)
    for i, label in enumerate(["base", *[f"user-{u}" for u in users]]):
        row = images[i * len(prompts) : (i + 1) * len(prompts)]
        writer.add_image(f"validation/{label}", np.concatenate(list(row), axis=1), step, dataformats="HWC")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="PPD training rank (started by the deepspeed launcher or torchrun)"
    )
    ap.add_argument("--spec", required=True, type=Path)
    ap.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = ap.parse_args(argv)
    launch.exit_with_parent()
    spec = json.loads(args.spec.read_text())
    if spec.get("ranks_lock"):
        launch.hold_as_rank(Path(spec["ranks_lock"]))
    cfg = PPDConfig.model_validate(spec["config"])
    trainer, run_dir = spec["trainer"], Path(spec["run_dir"])

    import deepspeed

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    def barrier() -> None:
        torch.distributed.barrier()

    t = cfg.train
    pairs_per_rank = t.pairs_per_step // world
    backbone = load_backbone(
        cfg.backbone, Path(spec["dirs"]["pretrain"]) if spec["dirs"].get("pretrain") else None, device
    )
    for module in backbone.networks().values() if hasattr(backbone, "networks") else [backbone.denoiser]:
        module.requires_grad_(False).eval()
    data = TrainData(spec, trainer, device)
    adapter = backbone.new_adapter(
        data.embedding_shape,
        num_tokens=cfg.adapter.num_tokens,
        rows=cfg.adapter.rows,
        seed=t.seed,
    )
    backbone.install_adapter(adapter)
    engine, _, _, _ = deepspeed.initialize(
        model=adapter,
        model_parameters=[p for p in adapter.parameters()],
        config=ds_config(cfg, pairs_per_rank),
    )
    beta = t.beta_dpo if t.beta_dpo is not None else BETA_DPO_DEFAULTS[cfg.backbone.kind]
    sampler = PairSampler(len(data.pairs), t.pairs_per_step, t.seed, rank, world)
    ckpt_dir = run_dir / "checkpoints"
    start = 0
    if t.resume == "latest":
        loaded = checkpoint.load(engine, ckpt_dir, rank)
        if loaded is not None:
            start, rng = loaded
            checkpoint.restore_rng(rng["global"])
    eval_rows = read_fewshot(spec["dirs"]["fewshot"], "eval_pairs").to_pylist()
    eval_rows = [r for r in eval_rows if r["split"] == "seen" and r["user_id"] in data.user_first_set][
        : t.heldout_pairs
    ]

    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    bar = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        writer = SummaryWriter(str(run_dir / "tensorboard"), **forget_after(run_dir, start))
        bar = tqdm(
            total=t.steps, initial=start, desc=f"train {trainer}", unit="step", disable=None, mininterval=1.0
        )
    adapter.train()
    step_times: list[float] = []
    data_times: list[float] = []
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        x0, text, emb = data.batch(sampler.batch(step))
        t1 = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(int(t.seed * 1_000_003 + step * 1009 + rank))
        loss, m = pair_losses(
            backbone,
            engine.module,
            trainer,
            x0,
            text,
            emb,
            beta,
            g,
            cfg.adapter.embedding_dropout,
            cfg.adapter.scale,
        )
        engine.backward(loss)
        engine.step()
        step_times.append(time.perf_counter() - t0)
        data_times.append(t1 - t0)
        done = step + 1
        if rank == 0 and (done % t.log_every == 0 or done == t.steps):
            line = {
                "step": done,
                "lr": engine.get_lr()[0],
                **m,
                "step_s": float(np.mean(step_times[-t.log_every :])),
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            for k, v in line.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    writer.add_scalar(f"train/{k}", v, done)
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m.get('implicit_acc', float('nan')):.2f}")
        if done % t.validate_every == 0 or done == t.steps:
            engine.module.eval()
            acc = heldout_accuracy(
                backbone, engine.module, data, eval_rows, trainer, beta, t.seed, cfg.adapter.scale
            )
            engine.module.train()
            if rank == 0:
                with open(run_dir / "validation.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, "heldout_implicit_acc": acc}) + "\n")
                if math.isfinite(acc):
                    writer.add_scalar("val/heldout_implicit_acc", acc, done)
                validation_grid(backbone, engine.module, data, eval_rows, cfg, done, run_dir, writer)
        if done % t.checkpoint_every == 0 or done == t.steps:
            checkpoint.save(engine, ckpt_dir, done, rank, barrier, t.keep_checkpoints)
        if bar is not None:
            bar.update(1)
    if rank == 0:
        bar.close()
        writer.close()
        _finish(cfg, spec, engine.module, backbone, data, run_dir, step_times, data_times)
    barrier()


def forget_after(run_dir: Path, start: int) -> dict:
    """Rank 0, before training from step ``start``: drop what an interrupted attempt logged past it, so a
    resumed run logs every step once. Returns the SummaryWriter options: from scratch the old event files
    are removed; on resume TensorBoard discards their events past ``start`` (``purge_step``)."""
    for name in ("metrics.jsonl", "validation.jsonl"):
        truncate_jsonl(run_dir / name, start)
    if start == 0:
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        return {}
    return {"purge_step": start + 1}  # steps 1..start were logged before the checkpoint at start


def _finish(cfg, spec, adapter, backbone, data: TrainData, run_dir: Path, step_times, data_times) -> None:
    """Rank 0: export the adapter and write the run summary."""
    import pyarrow as pa

    from ppd_core.models.export import export_adapter, export_dir

    table, emb = read_embeddings(Path(spec["dirs"]["embed"]), spec["embedder"])
    users = pa.table(
        {
            "user_id": table.column("user_id"),
            "shot_set_id": table.column("shot_set_id"),
            "split": table.column("split"),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb.reshape(-1).astype(np.float32)), int(np.prod(emb.shape[1:]))
            ),
        }
    )
    export_adapter(
        adapter,
        backbone,
        export_dir(run_dir),
        cfg.model_dump(mode="json"),
        users,
        step=cfg.train.steps,
        require_diffusers=False,
    )
    validation = (
        [json.loads(x) for x in (run_dir / "validation.jsonl").read_text().splitlines()]
        if (run_dir / "validation.jsonl").exists()
        else []
    )
    summary = {
        "trainer": spec["trainer"],
        "steps": cfg.train.steps,
        "heldout_implicit_acc": validation[-1]["heldout_implicit_acc"] if validation else None,
        "heldout_curve": validation,
        "mean_step_s": float(np.mean(step_times)) if step_times else None,
        "data_share_of_step": float(np.sum(data_times) / max(np.sum(step_times), 1e-9))
        if step_times
        else None,
        "embedding_shape": list(data.embedding_shape),
    }
    atomic_write_json(run_dir / "summary.json", summary)


if __name__ == "__main__":
    main()

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
logged after the resumed checkpoint (``metrics.jsonl`` and ``validation.jsonl`` lines past its step), and
TensorBoard's event file is rewritten to hold what was logged through that step (the writer is flushed
before every checkpoint), so every step is in the logs once and TensorBoard's history is one file.

A rank ends itself when the process that launched training is gone (:func:`launch.exit_with_parent`), and
holds the run's ranks lock while it runs (:func:`launch.hold_as_rank`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ppd_core.config import BETA_DPO_DEFAULTS, PPDConfig
from ppd_core.data.fewshot import read_fewshot, subset_key
from ppd_core.embed.extract import read_embeddings
from ppd_core.manifest import atomic_write_json, resume_tensorboard, truncate_jsonl
from ppd_core.models.factory import load_backbone
from ppd_core.train import checkpoint, launch
from ppd_core.train.cache import LatentCache
from ppd_core.train.objectives import OBJECTIVES, Objective, draw, reference_mse
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


def _rows_by_user(
    pairs: list[dict], set_of_pair: dict, set_ids: list, users: list
) -> tuple[dict, dict, dict]:
    """The embedding row of each shot set, the rows of each user and each training pair's own-set row (None: in
    no set). Raises for a pair whose user has no set without it (the fewshot stage drops such pairs).

    ``pairs``: the training pairs; ``set_of_pair``: pair id -> the shot set holding it; ``set_ids`` and ``users``:
    each embedding row's shot set and user."""
    row_of_set = {sid: i for i, sid in enumerate(set_ids)}
    rows_of_user: dict = {}
    for i, uid in enumerate(users):
        rows_of_user.setdefault(uid, []).append(i)
    own_row = {}
    for r in pairs:
        pid = r["pair_id"]
        own = row_of_set.get(set_of_pair.get(pid))
        if len(rows_of_user.get(r["user_id"], ())) - (own is not None) < 1:
            raise RuntimeError(f"pair {pid}: its user has no shot set without it")
        own_row[pid] = own
    return row_of_set, rows_of_user, own_row


class _UserMean:
    """``train.conditioning = user_mean``: a pair reads the mean embedding of its user's shot sets, leaving out the
    set that holds the pair (so its own label never conditions it). Per-user sums are kept, and per pair only the
    row of its own set, so memory grows with users, not with pairs times sets. Arguments: :func:`_rows_by_user`."""

    def __init__(
        self, pairs: list[dict], set_of_pair: dict, set_ids: list, users: list, embeddings: torch.Tensor
    ):
        _, rows_of_user, self.own_row = _rows_by_user(pairs, set_of_pair, set_ids, users)
        self.embeddings = embeddings
        self.counts = {u: len(rows) for u, rows in rows_of_user.items()}
        self.sums = {u: embeddings[rows].double().sum(0) for u, rows in rows_of_user.items()}

    def __call__(self, rows: list[dict]) -> torch.Tensor:
        out = []
        for r in rows:
            own, total, n = self.own_row[r["pair_id"]], self.sums[r["user_id"]], self.counts[r["user_id"]]
            out.append(total / n if own is None else (total - self.embeddings[own].double()) / (n - 1))
        return torch.stack(out).to(self.embeddings.dtype)


class _UserSubset:
    """``train.conditioning = user_subset``: a pair reads the mean of a subset of its user's sets without the one
    that holds it, fixed per pair for a seed: the set the fewshot stage chose for it, then k - 1 more in a seeded
    order, k uniform in 1..(its user's sets without the pair). Training then sees one noisy set, as a new user
    gives, as well as the cleaner means that seen users are evaluated on. Each pair's subset rows are listed once
    here. Arguments: :func:`_rows_by_user`, and the seed."""

    def __init__(
        self,
        pairs: list[dict],
        set_of_pair: dict,
        set_ids: list,
        users: list,
        embeddings: torch.Tensor,
        seed: int,
    ):
        row_of_set, rows_of_user, own_row = _rows_by_user(pairs, set_of_pair, set_ids, users)
        self.embeddings = embeddings
        self.subsets = {}
        for r in pairs:
            pid, own = r["pair_id"], own_row[r["pair_id"]]
            chosen = row_of_set[r["shot_set_id"]]
            rest = [i for i in rows_of_user[r["user_id"]] if i not in (own, chosen)]
            k = 1 + int(subset_key(seed, pid) / 2**64 * (len(rest) + 1))
            extra = sorted(rest, key=lambda i: subset_key(seed, pid, set_ids[i]))[: k - 1]
            self.subsets[pid] = torch.as_tensor([chosen, *extra], device=embeddings.device)

    def __call__(self, rows: list[dict]) -> torch.Tensor:
        means = [self.embeddings[self.subsets[r["pair_id"]]].double().mean(0) for r in rows]
        return torch.stack(means).to(self.embeddings.dtype)


class TrainData:
    """Training pairs with their x0, text states and conditioning embeddings."""

    def __init__(
        self,
        spec: dict,
        objective: Objective,
        device: torch.device,
        like: TrainData | None = None,
        conditioning: str = "shot_set",
        seed: int = 0,
    ):
        dirs = {k: Path(v) for k, v in spec["dirs"].items()}
        reads_other_sets = conditioning in ("user_mean", "user_subset")
        if (
            like is not None
        ):  # another run of the same launch: the same pairs, latent cache and set membership
            self.pairs, self.cache, self.set_of_pair = like.pairs, like.cache, like.set_of_pair
        else:
            self.pairs = read_fewshot(dirs["fewshot"], "train_pairs").to_pylist()
            if not self.pairs:
                raise RuntimeError("no training pairs")
            self.cache = LatentCache(dirs["cache_latents"], device).preload()
            self.set_of_pair = None
            if reads_other_sets:
                sets = read_fewshot(
                    dirs["fewshot"], "shot_sets", columns=["shot_set_id", "pair_ids"]
                ).to_pylist()
                self.set_of_pair = {p: s["shot_set_id"] for s in sets for p in s["pair_ids"]}
        table, emb = read_embeddings(dirs["embed"], spec["embedder"])
        self.embedding_shape = tuple(emb.shape[1:])
        set_ids = table.column("shot_set_id").to_pylist()
        self.by_set = {sid: i for i, sid in enumerate(set_ids)}
        self.embeddings = torch.from_numpy(emb).to(device)  # (S, *shape)
        users = table.column("user_id").to_pylist()
        self.user_first_set = {}
        for sid, uid in zip(set_ids, users, strict=True):
            self.user_first_set.setdefault(uid, sid)
        self.objective = objective
        self.device = device
        self.other_sets = None  # user_mean / user_subset: the conditioning read from the user's other sets
        if reads_other_sets and objective.conditioned:
            args = (self.pairs, self.set_of_pair, set_ids, users, self.embeddings)
            self.other_sets = _UserSubset(*args, seed) if conditioning == "user_subset" else _UserMean(*args)

    def condition(self, rows: list[dict], shot_set_ids: list[str] | None = None) -> torch.Tensor:
        """(P, *embedding_shape): the conditioning shot set's embedding (under ``train.conditioning = user_mean``
        or ``user_subset`` the mean of the user's other sets or of a subset of them, unless ``shot_set_ids`` names
        the sets, as the held-out accuracy and the validation grids do), or the constant zero embedding for an
        objective that does not read the user."""
        if not self.objective.conditioned:
            return torch.zeros((len(rows), *self.embedding_shape), device=self.device)
        if self.other_sets is not None and shot_set_ids is None:
            return self.other_sets(rows)
        ids = shot_set_ids or [r["shot_set_id"] for r in rows]
        return self.embeddings[torch.as_tensor([self.by_set[s] for s in ids], device=self.device)]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0, text states and this objective's conditioning of the pairs ``indices``."""
        rows, x0, text = self.shared_batch(indices)
        return x0, text, self.condition(rows)

    def shared_batch(self, indices: np.ndarray) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        """The pairs, their x0 (2P, C, H, W) and their text states (2P, T, D) as [winners | losers]."""
        rows = [self.pairs[i] for i in indices]
        x0 = self.cache.get("image", [r["winner_uid"] for r in rows] + [r["loser_uid"] for r in rows])
        text = self.cache.get("text", [r["caption"] for r in rows] * 2)
        return rows, x0, text


@torch.no_grad()
def heldout_accuracy(backbone, adapter, data: TrainData, eval_rows: list[dict], beta, seed, scale) -> float:
    """Implicit accuracy on held-out pairs of seen users, fixed noise and timesteps (comparable across steps)."""
    if not eval_rows:
        return float("nan")
    g = torch.Generator(device=data.device).manual_seed(seed + 7919)
    x0 = data.cache.get("image", [r["winner_uid"] for r in eval_rows] + [r["loser_uid"] for r in eval_rows])
    text = data.cache.get("text", [r["caption"] for r in eval_rows] * 2)
    sets = [data.user_first_set[r["user_id"]] for r in eval_rows]
    emb = data.condition(eval_rows, sets)
    return data.objective.heldout(backbone, adapter, x0, text, emb, beta, g, scale)["implicit_acc"]


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


@dataclass(frozen=True)
class Rank:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        torch.distributed.barrier()


def join_job() -> Rank:
    """Initialise the process group (gloo on CPU, nccl on GPU) and pick this rank's device and threads."""
    import deepspeed

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Rank(torch.distributed.get_rank(), world, device)


def load_frozen(cfg: PPDConfig, spec: dict, device: torch.device):
    """The frozen backbone every run of the launch trains an adapter on."""
    dirs = spec["dirs"]
    backbone = load_backbone(cfg.backbone, Path(dirs["pretrain"]) if dirs.get("pretrain") else None, device)
    for module in backbone.networks().values() if hasattr(backbone, "networks") else [backbone.denoiser]:
        module.requires_grad_(False).eval()
    return backbone


@dataclass
class Run:
    """One trained model of the launch: its objective, data view, engine, log and where it starts."""

    spec: dict
    objective: Objective
    run_dir: Path
    data: TrainData
    engine: object
    start: int
    rng: dict
    eval_rows: list[dict]
    log: RunLog | None = None
    step_times: list[float] = field(default_factory=list)
    data_times: list[float] = field(default_factory=list)

    @property
    def adapter(self):
        return self.engine.module


def run_specs(spec: dict) -> list[dict]:
    """The runs a spec asks for: ``spec["runs"]`` (each with its trainer, embedder and run_dir), or the
    spec itself for a launch of one run."""
    shared = {k: v for k, v in spec.items() if k != "runs"}
    return [{**shared, **r} for r in spec["runs"]] if spec.get("runs") else [spec]


def start_run(cfg: PPDConfig, spec: dict, me: Rank, backbone, like: TrainData | None) -> Run:
    """A run's adapter (fresh, seeded by ``train.seed``) in its own DeepSpeed engine, resumed from its newest
    complete checkpoint when ``train.resume`` is latest. Leaves the global RNG as the run alone would see it."""
    import deepspeed

    from ppd_core.train.checkpoint import capture_rng, restore_rng

    objective = OBJECTIVES[spec["trainer"]]
    data = TrainData(spec, objective, me.device, like, cfg.train.conditioning, cfg.train.seed)
    adapter = backbone.new_adapter(
        data.embedding_shape, num_tokens=cfg.adapter.num_tokens, rows=cfg.adapter.rows, seed=cfg.train.seed
    )
    backbone.install_adapter(adapter)
    engine, _, _, _ = deepspeed.initialize(
        model=adapter,
        model_parameters=list(adapter.parameters()),
        config=ds_config(cfg, cfg.train.pairs_per_step // me.world),
    )
    run_dir, start = Path(spec["run_dir"]), 0
    if cfg.train.resume == "latest":
        loaded = checkpoint.load(engine, run_dir / "checkpoints", me.rank)
        if loaded is not None:
            start, rng = loaded
            restore_rng(rng["global"])
    t = cfg.train
    eval_rows = read_fewshot(spec["dirs"]["fewshot"], "eval_pairs").to_pylist()
    eval_rows = [r for r in eval_rows if r["split"] == "seen" and r["user_id"] in data.user_first_set][
        : t.heldout_pairs
    ]
    return Run(spec, objective, run_dir, data, engine, start, capture_rng(), eval_rows)


class RunLog:
    """Rank 0's record of a run: metrics.jsonl, validation.jsonl, TensorBoard and the progress bar. Other
    ranks get an inactive one (every method does nothing)."""

    def __init__(self, run_dir: Path, rank: int, start: int, steps: int, label: str):
        self.run_dir, self.active = run_dir, rank == 0
        self.writer = self.bar = None
        if self.active:
            from tqdm.auto import tqdm

            forget_after(run_dir, start)
            self.writer = resume_tensorboard(run_dir / "tensorboard", start)
            self.bar = tqdm(
                total=steps, initial=start, desc=label, unit="step", disable=None, mininterval=1.0
            )

    def metrics(self, step: int, line: dict) -> None:
        if not self.active:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **line}) + "\n")
        for k, v in line.items():
            if isinstance(v, float) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, step)
        self.bar.set_postfix(loss=f"{line['loss']:.4f}", acc=f"{line.get('implicit_acc', float('nan')):.2f}")

    def validation(self, step: int, heldout_acc: float) -> None:
        if not self.active:
            return
        with open(self.run_dir / "validation.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "heldout_implicit_acc": heldout_acc}) + "\n")
        if math.isfinite(heldout_acc):
            self.writer.add_scalar("val/heldout_implicit_acc", heldout_acc, step)

    def flush(self) -> None:
        """Before a checkpoint: what was logged up to it is on disk, for a run resumed from it."""
        if self.active:
            self.writer.flush()

    def advance(self) -> None:
        if self.active:
            self.bar.update(1)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.writer.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="PPD training rank (started by the deepspeed launcher or torchrun)"
    )
    ap.add_argument("--spec", required=True, type=Path)
    ap.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = ap.parse_args(argv)
    launch.exit_with_parent()
    spec = json.loads(args.spec.read_text())
    specs = run_specs(spec)
    for s in specs:
        if s.get("ranks_lock"):
            launch.hold_as_rank(Path(s["ranks_lock"]))
    cfg = PPDConfig.model_validate(spec["config"])

    me = join_job()
    backbone = load_frozen(cfg, spec, me.device)
    from ppd_core.train.checkpoint import capture_rng, restore_rng

    rng_at_start, runs = capture_rng(), []
    for s in specs:
        restore_rng(rng_at_start)  # each run starts from the global RNG state it would have had alone
        runs.append(start_run(cfg, s, me, backbone, runs[0].data if runs else None))
    train(cfg, me, backbone, runs)
    if me.rank == 0:
        for run in runs:
            backbone.install_adapter(run.adapter)
            _finish(
                cfg, run.spec, run.adapter, backbone, run.data, run.run_dir, run.step_times, run.data_times
            )
    me.barrier()


def train(cfg, me: Rank, backbone, runs: list[Run]) -> None:
    """Steps from each run's start to ``train.steps``: one batch and one draw of noise, timesteps and null
    mask per step, the reference error once, then each run's loss, logging, validation and checkpoints.
    Each run sees exactly what it would see trained alone (its own global RNG state is swapped in)."""
    from ppd_core.train.checkpoint import capture_rng, restore_rng

    t = cfg.train
    beta = t.beta_dpo if t.beta_dpo is not None else BETA_DPO_DEFAULTS[cfg.backbone.kind]
    data = runs[0].data
    sampler = PairSampler(len(data.pairs), t.pairs_per_step, t.seed, me.rank, me.world)
    for run in runs:
        run.log = RunLog(run.run_dir, me.rank, run.start, t.steps, f"train {run.objective.name}")
        run.adapter.train()
    for step in range(min(r.start for r in runs), t.steps):
        due = [r for r in runs if r.start <= step]
        t0 = time.perf_counter()
        rows, x0, text = data.shared_batch(sampler.batch(step))
        t1 = time.perf_counter()
        g = torch.Generator(device=me.device).manual_seed(int(t.seed * 1_000_003 + step * 1009 + me.rank))
        drawn = draw(backbone, x0, len(rows), g, cfg.adapter.embedding_dropout)
        ref = reference_mse(backbone, drawn, text) if any(r.objective.needs_reference for r in due) else None
        shared_s = time.perf_counter() - t0
        for run in due:
            t2 = time.perf_counter()
            restore_rng(run.rng)
            backbone.install_adapter(run.adapter)
            emb = run.data.condition(rows)
            loss, m = run.objective.loss_on(
                backbone, run.adapter, drawn, text, emb, beta, cfg.adapter.scale, ref
            )
            run.engine.backward(loss)
            run.engine.step()
            run.step_times.append(shared_s + time.perf_counter() - t2)
            run.data_times.append(t1 - t0)
            _after_step(cfg, me, backbone, run, step + 1, m, beta)
            run.rng = capture_rng()
    for run in runs:
        run.log.close()


def _after_step(cfg, me: Rank, backbone, run: Run, done: int, m: dict, beta: float) -> None:
    """A run's logging, validation and checkpoint after step ``done``."""
    t, adapter, log = cfg.train, run.adapter, run.log
    if done % t.log_every == 0 or done == t.steps:
        step_s = float(np.mean(run.step_times[-t.log_every :]))
        log.metrics(done, {"lr": run.engine.get_lr()[0], **m, "step_s": step_s})
    if done % t.validate_every == 0 or done == t.steps:
        adapter.eval()
        acc = heldout_accuracy(backbone, adapter, run.data, run.eval_rows, beta, t.seed, cfg.adapter.scale)
        adapter.train()
        log.validation(done, acc)
        if log.active:
            validation_grid(backbone, adapter, run.data, run.eval_rows, cfg, done, run.run_dir, log.writer)
    if done % t.checkpoint_every == 0 or done == t.steps:
        log.flush()
        checkpoint.save(
            run.engine, run.run_dir / "checkpoints", done, me.rank, me.barrier, t.keep_checkpoints
        )
    log.advance()


def forget_after(run_dir: Path, start: int) -> None:
    """Rank 0, before training from step ``start``: drop the lines that an interrupted attempt logged past it
    (all of them from scratch), so that a resumed run logs every step once. TensorBoard's events are
    treated alike when its writer opens (:func:`~ppd_core.manifest.resume_tensorboard`)."""
    for name in ("metrics.jsonl", "validation.jsonl"):
        truncate_jsonl(run_dir / name, start)


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

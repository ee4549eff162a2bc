"""The `encoder` stage: train the few-shot preference encoder on seen users' labels only.

1. **Features.** Every image the few-shot tables name is run once through the frozen feature source
   (:mod:`ppd_core.embed.features`) into ``features/shard-*.parquet``; the embedder, the probe and
   ``ppd generate --shots`` read that cache instead of recomputing per shot set.
2. **Reward basis.** A low-rank Bradley-Terry model, one free vector per training user and a shared linear
   basis g, fitted full-batch on the training users' pairs with an L2 penalty (LoRe / PAL's user spaces).
   Fitted first and then frozen: trained jointly with 4-shot contexts, the basis memorises the training
   pairs and the encoder learns to trust contexts that new users' pairs never match.
3. **Encoder.** Each step draws ``users_per_step`` training users, a freshly resampled K-shot context per
   user and ``targets_per_user`` *other* pairs of the same user (a target never sits in its own context);
   loss = Bradley-Terry on the targets under z = encoder(context) (+ KL when variational).
   Validation users (a seeded share of the seen users, never trained on) get fixed contexts; their
   held-out pair accuracy every ``validate_every`` steps picks the kept weights.

Which pairs train it: a seen user's pairs outside their evaluation pairs (their shot sets' pairs and their
training pairs). Unseen users and evaluation pairs are never read, except as images to featurise.

Outputs: ``encoder.safetensors`` (the chosen weights; constructor arguments, feature source and
validation figures in its metadata), ``features/``, ``metrics.jsonl``, ``validation.jsonl``,
``tensorboard/``, ``checkpoints/`` (resumable: model, optimizer, RNG states, step) and ``summary.json``.
With ``members`` > 1, each member's own files sit under ``members/<m>/`` and ``encoder.safetensors`` is their
concatenation (z side by side, rewards summed): the embedder, probe and generation read it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ppd_core.config import EncoderConfig
from ppd_core.data.fewshot import read_fewshot
from ppd_core.embed.bradley_terry import fit_bradley_terry, standardised_differences
from ppd_core.embed.encoder_model import WEIGHTS_FILE, PreferenceEncoder
from ppd_core.embed.features import FeatureTable, load_feature_source, write_feature_shards
from ppd_core.embed.probe import single_thread
from ppd_core.errors import StageError
from ppd_core.manifest import atomic_write_bytes, atomic_write_json, resume_tensorboard, truncate_jsonl

Progress = Callable[[int, int], None]
CHECKPOINTS = "checkpoints"
MEMBERS = "members"  # members/<m>/: each member's own outputs when encoder.members > 1
LOG_EVERY = 10
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class EncoderInputs:
    fewshot: Path
    ingest: Path
    tiny_models: Path | None = None


# ------------------------------------------------------------------------------------------ data


def referenced_uids(fewshot_dir: Path) -> list[str]:
    """Every image uid of the shot sets, training pairs and evaluation pairs (sorted, unique)."""
    uids: set[str] = set()
    sets = read_fewshot(fewshot_dir, "shot_sets", columns=["winner_uids", "loser_uids"])
    for col in ("winner_uids", "loser_uids"):
        uids.update(sets.column(col).combine_chunks().flatten().to_pylist())
    for name in ("train_pairs", "eval_pairs"):
        table = pq.read_table(fewshot_dir / f"{name}.parquet", columns=["winner_uid", "loser_uid"])
        for col in ("winner_uid", "loser_uid"):
            uids.update(table.column(col).to_pylist())
    return sorted(uids)


def seen_user_pairs(fewshot_dir: Path) -> dict[int, list[tuple[str, str, str]]]:
    """Seen user -> their (pair_id, winner_uid, loser_uid) outside evaluation, sorted by pair_id."""
    pairs: dict[int, dict[str, tuple[str, str]]] = {}
    for r in read_fewshot(fewshot_dir, "shot_sets").to_pylist():
        if r["split"] == "seen":
            for pid, w, lo in zip(r["pair_ids"], r["winner_uids"], r["loser_uids"], strict=True):
                pairs.setdefault(int(r["user_id"]), {})[pid] = (w, lo)
    for r in read_fewshot(fewshot_dir, "train_pairs").to_pylist():
        pairs.setdefault(int(r["user_id"]), {})[r["pair_id"]] = (r["winner_uid"], r["loser_uid"])
    return {u: [(pid, *wl) for pid, wl in sorted(p.items())] for u, p in sorted(pairs.items())}


def split_users(users: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training users, validation users): a seeded shuffle of the sorted ids, at least one of each."""
    if len(users) < 2:
        raise StageError(f"the encoder needs at least 2 seen users with enough pairs, found {len(users)}")
    order = np.random.default_rng([seed, 1]).permutation(sorted(users))
    n_val = min(max(1, round(fraction * len(users))), len(users) - 1)
    return sorted(int(u) for u in order[n_val:]), sorted(int(u) for u in order[:n_val])


def draw_batch(
    rng: np.random.Generator, users: list[np.ndarray], count: int, shots: int, targets: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` users' (context (B, K, 2), targets (B, T, 2)) feature rows of (winner, loser).

    ``users[i]`` is a (P_i, 2) array with P_i > shots. The context is a fresh draw of ``shots`` pairs;
    targets come only from the user's remaining pairs (with replacement when fewer than ``targets``)."""
    picked = rng.integers(0, len(users), size=count)
    context, target = [], []
    for i in picked:
        pairs = users[i]
        order = rng.permutation(len(pairs))
        rest = order[shots:]
        context.append(pairs[order[:shots]])
        target.append(pairs[rest[rng.integers(0, len(rest), size=targets)]])
    return np.stack(context), np.stack(target)


# ---------------------------------------------------------------------------------- checkpoints


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / CHECKPOINTS).glob("step-*.pt"))


def _save_checkpoint(out_dir: Path, step: int, state: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out_dir / CHECKPOINTS / f"step-{step:08d}.pt", buf.getvalue())
    for old in _checkpoints(out_dir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- training


def fit_basis(
    model: PreferenceEncoder, X: torch.Tensor, pairs: np.ndarray, cfg: EncoderConfig
) -> dict[str, float]:
    """Fit ``model.basis`` with one free vector per training user. ``pairs``: (P, 3) user, winner, loser rows."""
    n_users = int(pairs[:, 0].max()) + 1
    users = torch.nn.Embedding(n_users, cfg.z_dim).to(X.device)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(cfg.seed)
        users.weight.copy_(0.1 * torch.randn(n_users, cfg.z_dim, generator=gen))
    index = torch.as_tensor(pairs, device=X.device)
    diffs = standardised_differences(X, index[:, 1:], model.feature_std)  # (P, D)
    fit = fit_bradley_terry(
        model.basis, users, index[:, 0], diffs, cfg.basis_steps, cfg.basis_lr, cfg.basis_l2
    )
    return {"basis_loss": fit["loss"], "basis_train_accuracy": fit["train_accuracy"]}


def pair_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs ranked right (a zero margin counts half)."""
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())


def validation_accuracy(
    model: PreferenceEncoder, G: torch.Tensor, contexts: list[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Held-out pair accuracy over (context, its user's other pairs); ``G`` (N, Z) = g(every image)."""
    margins = []
    with torch.no_grad():
        for context, targets in contexts:
            mu, _ = model.encode_basis(G[context[None, :, 0]], G[context[None, :, 1]])  # (1, Z)
            margins.append((mu * (G[targets[:, 0]] - G[targets[:, 1]])).sum(-1))  # (T,)
    return pair_accuracy(torch.cat(margins))


def encoder_stage(
    cfg: EncoderConfig, shots: int, inputs: EncoderInputs, out_dir: Path, progress: Progress | None = None
) -> dict:
    """Stage body: features, basis, encoder training with checkpoints, the chosen weights and a summary."""
    from ppd_core.data.images import ingest_images
    from ppd_core.weights import resolve_device

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    source = load_feature_source(cfg.features, inputs.tiny_models, cfg.device)
    store = ingest_images(inputs.ingest)
    feature_counts = write_feature_shards(
        source,
        referenced_uids(inputs.fewshot),
        lambda uid: store.get_pil(uid).convert("RGB"),
        out_dir,
        batch_size=cfg.feature_batch,
    )
    feature_seconds = time.perf_counter() - started
    with single_thread() if device.type == "cpu" else contextlib.nullcontext():
        train = train_encoder if cfg.members == 1 else train_members
        summary = train(cfg, shots, FeatureTable(out_dir), inputs.fewshot, out_dir, device, progress)
    summary = {
        "features": feature_counts,
        "feature_seconds": round(feature_seconds, 2),
        **summary,
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def train_members(
    cfg: EncoderConfig,
    shots: int,
    table: FeatureTable,
    fewshot_dir: Path,
    out_dir: Path,
    device: torch.device,
    progress: Progress | None = None,
) -> dict:
    """``cfg.members`` encoders, member m trained by :func:`train_encoder` with seed ``cfg.seed + m`` under
    ``members/<m>/`` (its own checkpoints, metrics and TensorBoard); a member whose weights and summary exist
    is read back, not retrained (resume). Saves their concatenation (:meth:`PreferenceEncoder.concatenate`)."""
    models, summaries = [], []
    for m in range(cfg.members):
        member_dir = out_dir / MEMBERS / str(m)
        member_dir.mkdir(parents=True, exist_ok=True)
        done = member_dir / "summary.json"
        if not (done.is_file() and (member_dir / WEIGHTS_FILE).is_file()):

            def member_progress(step: int, total: int, m: int = m) -> None:
                if progress:
                    progress(m * total + step, cfg.members * total)

            member_cfg = cfg.model_copy(update={"seed": cfg.seed + m, "members": 1})
            result = train_encoder(member_cfg, shots, table, fewshot_dir, member_dir, device, member_progress)
            atomic_write_json(done, result)
        summaries.append(json.loads(done.read_text()))
        models.append(PreferenceEncoder.load(member_dir, device)[0])
    model = PreferenceEncoder.concatenate(models)
    val_accuracy = float(np.mean([s["val_pair_accuracy"] for s in summaries]))
    extra = {
        "feature_source": table.source_identity,
        "feature_spec": cfg.features.model_dump(mode="json"),
        "shots": shots,
        "members": cfg.members,
        "best_step": [s["best_step"] for s in summaries],
        "val_accuracy": val_accuracy,
    }
    model.save(out_dir, extra)
    return {
        "members": cfg.members,
        "z_dim": model.z_dim,
        "train_users": [s["train_users"] for s in summaries],
        "train_pairs": [s["train_pairs"] for s in summaries],
        "validation_users": [s["validation_users"] for s in summaries],
        "basis_train_accuracy": [round(s["basis_train_accuracy"], 4) for s in summaries],
        "best_step": [s["best_step"] for s in summaries],
        "val_pair_accuracy": round(val_accuracy, 4),
        "member_val_pair_accuracy": [s["val_pair_accuracy"] for s in summaries],
    }


def train_encoder(
    cfg: EncoderConfig,
    shots: int,
    table: FeatureTable,
    fewshot_dir: Path,
    out_dir: Path,
    device: torch.device,
    progress: Progress | None = None,
) -> dict:
    """Basis fit, then encoder steps with validation and checkpoints; saves the chosen weights."""
    X = torch.from_numpy(table.matrix).to(device)  # (N_images, D)
    by_user = {
        u: table.rows([x for _, w, lo in p for x in (w, lo)]).reshape(-1, 2)
        for u, p in seen_user_pairs(fewshot_dir).items()
        if len(p) > shots
    }
    train_users, val_users = split_users(list(by_user), cfg.validation_fraction, cfg.seed)
    train_pairs = [by_user[u] for u in train_users]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = PreferenceEncoder(
            table.dim, cfg.z_dim, cfg.hidden, cfg.pooling, cfg.variational, cfg.pair_encoder
        ).to(device)
    train_images = np.unique(np.concatenate(train_pairs).reshape(-1))
    model.feature_mean.copy_(X[train_images].mean(0))
    model.feature_std.copy_(X[train_images].std(0).clamp(min=1e-6))

    val_rng = np.random.default_rng([cfg.seed, 2])
    val_contexts = []
    for u in val_users:
        pairs = by_user[u]
        for _ in range(cfg.validation_contexts):
            order = val_rng.permutation(len(pairs))
            val_contexts.append((pairs[order[:shots]], pairs[order[shots:]]))

    metrics_path, val_path = out_dir / "metrics.jsonl", out_dir / "validation.jsonl"
    found = _checkpoints(out_dir)
    # the encoder's optimizer never sees the basis (fitted first, then frozen)
    opt = torch.optim.AdamW(
        [p for n, p in model.named_parameters() if not n.startswith("basis")],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    if found:  # resume: every state that the next step reads comes from the checkpoint
        state = torch.load(found[-1], map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        gen = torch.Generator(device=device)
        gen.set_state(state["torch_rng"].cpu())
        start, best, basis_info = int(state["step"]), json.loads(state["best"]), json.loads(state["basis"])
        best_state = state["best_model"]
        for path in (metrics_path, val_path):
            truncate_jsonl(path, start)
    else:
        users_of_pairs = np.concatenate(
            [np.column_stack([np.full(len(p), i), p]) for i, p in enumerate(train_pairs)]
        )  # (P, 3): training-user index, winner row, loser row
        basis_info = fit_basis(model, X, users_of_pairs, cfg)
        rng = np.random.default_rng([cfg.seed, 3])
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        start = 0
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for path in (metrics_path, val_path):
            path.unlink(missing_ok=True)
    model.basis.weight.requires_grad_(False)
    with torch.no_grad():
        G = model.g(X)  # (N_images, Z): the basis is frozen from here on, so every image is projected once
    if not found:
        best = {"step": 0, "accuracy": validation_accuracy(model, G, val_contexts)}

    writer = resume_tensorboard(out_dir / "tensorboard", start)  # one event file, each step once
    bar = tqdm(total=cfg.steps, initial=start, desc="encoder", unit="step", disable=None, mininterval=1.0)
    window: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(start + 1, cfg.steps + 1):
        context, target = draw_batch(rng, train_pairs, cfg.users_per_step, shots, cfg.targets_per_user)
        mu, logvar = model.encode_basis(G[context[..., 0]], G[context[..., 1]])  # (B, Z)
        z = mu
        kl = torch.zeros((), device=device)
        if logvar is not None:
            noise = torch.randn(mu.shape, generator=gen, device=device)
            z = mu + noise * (0.5 * logvar).exp()
            kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        margin = (z[:, None, :] * (G[target[..., 0]] - G[target[..., 1]])).sum(-1)  # (B, T)
        bt = -F.logsigmoid(margin).mean()
        loss = bt + cfg.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(float(bt.detach()))
        bar.update(1)
        if step % LOG_EVERY == 0 or step == cfg.steps:
            line = {"step": step, "loss": float(np.mean(window)), "kl": float(kl), "lr": cfg.lr}
            line["seconds"] = round(time.perf_counter() - t0, 3)
            window = []
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            writer.add_scalar("encoder/bt_loss", line["loss"], step)
            if progress:
                progress(step, cfg.steps)
        if step % cfg.validate_every == 0 or step == cfg.steps:
            model.eval()
            acc = validation_accuracy(model, G, val_contexts)
            model.train()
            if acc > best["accuracy"]:
                best = {"step": step, "accuracy": acc}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            with open(val_path, "a") as f:
                f.write(json.dumps({"step": step, "val_accuracy": acc, "best_step": best["step"]}) + "\n")
            writer.add_scalar("encoder/val_pair_accuracy", acc, step)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            writer.flush()
            _save_checkpoint(
                out_dir,
                step,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "numpy_rng": json.dumps(rng.bit_generator.state),
                    "torch_rng": gen.get_state(),
                    "step": step,
                    "best": json.dumps(best),
                    "best_model": best_state,
                    "basis": json.dumps(basis_info),
                },
            )
    bar.close()
    writer.close()

    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():  # unit-scale z over training users' contexts (a fixed draw, so resume-safe)
        context, _ = draw_batch(np.random.default_rng([cfg.seed, 4]), train_pairs, 2048, shots, 1)
        mu, _ = model.encode_basis(G[context[..., 0]], G[context[..., 1]])  # (2048, Z)
        z_std = mu.std(0).clamp(min=1e-6)
    model.rescale_z(z_std)
    extra = {
        "feature_source": table.source_identity,
        "feature_spec": cfg.features.model_dump(mode="json"),
        "shots": shots,
        "best_step": best["step"],
        "val_accuracy": best["accuracy"],
        "z_std_before_rescale": [round(float(x), 6) for x in z_std],
    }
    model.save(out_dir, extra)
    return {
        "train_users": len(train_users),
        "validation_users": len(val_users),
        "train_pairs": int(sum(len(p) for p in train_pairs)),
        "resumed_from_step": start,
        **basis_info,
        "best_step": best["step"],
        "val_pair_accuracy": round(best["accuracy"], 4),
    }

"""The ``pretrain`` stage body: the toy backbone trained from scratch on the ingested images.

Every distinct (caption, image) among the winners and losers of the kept pairs is a training example
(the toy world is small: all images stay in memory as one uint8 tensor). Plain v-prediction MSE with
caption dropout (for classifier-free guidance), AdamW with a short linear warmup and a cosine decay,
gradient clipping at 1, and an EMA of the weights whose decay ramps up as
``min(ema_decay, (1 + step) / (10 + step))`` (so a short run is not dominated by its random start).
The EMA weights are saved. Deterministic on the CPU for a given seed: batches, caption dropout,
noise and timesteps come from one seeded generator.

Only the UNet trains; the random tiny CLIP text encoder stays frozen, as CLIP does under Stable
Diffusion. Measured on the default world: training it jointly made it amplify the colour words and
squash the shape words (distances between the states of "a red circle" and "a red square" fell from
~3 to ~0.3 while colour distances grew to ~13), and the UNet then drew the same blob for every shape.

Output (inside ``out_dir``)::

    backbone/       ToyBackbone.save layout (EMA weights)
    metrics.jsonl   {"step", "loss" (mean since the previous line), "lr", "seconds"} every 10 steps
    samples.png     eval captions (rows) x seeds (columns), sampled from the saved backbone
    eval.json       caption colour accuracy and the attribute distribution of samples vs training images

Colour accuracy: an image's object is found as in :func:`~ppd_core.data.synthetic.measure_attributes`
(soft mask of pixels far from the median border colour); the hue of the mask-weighted mean object
colour is compared with the hues of the world's reference colours, and the nearest one must be the
caption's colour. Hue ignores the object's saturation and brightness (style attributes), and the
six reference hues are at least 30 degrees apart. No object, or a grey one, counts as wrong.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ppd_core.config import BackboneConfig, PretrainConfig
from ppd_core.data.fewshot import read_pairs
from ppd_core.data.images import ingest_images
from ppd_core.data.world_render import (
    ATTRIBUTES,
    CAPTIONS,
    COLOURS,
    MASK_HIGH,
    MASK_LOW,
    SHAPES,
    STYLE_RENDERING,
    caption_content,
    measure_attributes,
    render_images,
)
from ppd_core.errors import ConfigError
from ppd_core.models.grids import save_grid, to_uint8
from ppd_core.models.sampling import sample
from ppd_core.models.toy import ToyBackbone

LOG_EVERY = 10
MAX_WARMUP_STEPS = 50
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
EVAL_PER_CAPTION = 8  # samples per eval caption (also the columns of samples.png)
EVAL_SEED = 10_000  # eval sample j of every caption uses seed EVAL_SEED + j
EVAL_STEPS = 20
EVAL_GUIDANCE = 3.0
MAX_EVAL_CAPTIONS = 30
GRID_SCALE = 4  # samples.png: nearest-neighbour upscaling of each 16 px image
MIN_OBJECT_PIXELS = 1.0  # soft mask mass below this: no object
MIN_CHROMA = 20.0  # 0..255 units; a greyer mean object colour has no reliable hue


# ----------------------------------------------------------------------------------------- data


def training_examples(ingest_dir: Path, resolution: int) -> tuple[list[str], torch.Tensor]:
    """Distinct (caption, image) of the kept pairs' winners and losers, sorted by (image uid, caption):
    (captions (N,), images uint8 (N, R, R, 3))."""
    pairs = read_pairs(ingest_dir)
    captions = pairs.column("caption").to_pylist()
    examples = sorted(
        set(zip(pairs.column("winner_uid").to_pylist(), captions, strict=True))
        | set(zip(pairs.column("loser_uid").to_pylist(), captions, strict=True))
    )
    uids = sorted({uid for uid, _ in examples})
    store = ingest_images(ingest_dir)
    pixels = store.get_array(uids, size=resolution)  # (U, R, R, 3)
    row = {uid: i for i, uid in enumerate(uids)}
    images = torch.from_numpy(pixels[[row[uid] for uid, _ in examples]])  # (N, R, R, 3) uint8
    return [caption for _, caption in examples], images


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of example indices: a fresh permutation per epoch, concatenated."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


# ------------------------------------------------------------------------------------- training


def lr_factor(i: int, warmup: int, steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``i`` (0-based): linear warmup to 1 over ``warmup``
    steps (the first step already trains), then a cosine decay towards 0 at ``steps``."""
    if i < warmup:
        return (i + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))


CAPTION_TABLE_LIMIT = 4096  # distinct captions encoded once up front; beyond this, encode per step


def _caption_encoder(backbone: ToyBackbone, captions: list[str]) -> Callable[[list[str]], torch.Tensor]:
    """captions -> (B, T, D) text states of the frozen encoder; a lookup table when the captions are few."""
    vocab = sorted(set(captions) | {""})
    if len(vocab) > CAPTION_TABLE_LIMIT:
        return lambda batch: backbone.encode_prompt(batch).detach()
    row_of = {c: i for i, c in enumerate(vocab)}
    with torch.no_grad():
        table = torch.cat(
            [backbone.encode_prompt(vocab[i : i + 256]) for i in range(0, len(vocab), 256)]
        )  # (V, T, D)
    return lambda batch: table[[row_of[c] for c in batch]]


def _train(
    backbone: ToyBackbone,
    cfg: PretrainConfig,
    captions: list[str],
    images: torch.Tensor,
    metrics_path: Path,
    progress: Callable[[int, int], None] | None,
) -> dict:
    """Train in place and leave the EMA weights in the model; return loss figures."""
    backbone.unet.train()
    backbone.text_encoder.eval().requires_grad_(False)
    params = list(backbone.unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    warmup = max(1, min(MAX_WARMUP_STEPS, cfg.steps // 10))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(len(captions), cfg.batch_size, gen)
    text_of = _caption_encoder(backbone, captions)

    start, window, first_loss, last_logged = time.perf_counter(), [], None, None
    bar = tqdm(total=cfg.steps, desc="pretrain", unit="step", disable=None, mininterval=1.0)
    with open(metrics_path, "w") as metrics:
        for step in range(1, cfg.steps + 1):
            idx = next(batches)
            x0 = backbone.encode_images(images[idx])  # (B, 3, R, R) in [-1, 1]
            drop = (torch.rand(len(idx), generator=gen) < cfg.caption_dropout).tolist()
            text = text_of(["" if d else captions[i] for d, i in zip(drop, idx.tolist(), strict=True)])
            noise = torch.randn(x0.shape, generator=gen)  # (B, 3, R, R)
            t = backbone.sample_timesteps(len(idx), gen)  # (B,)
            pred = backbone.denoise(backbone.add_noise(x0, noise, t), t, text)
            loss = F.mse_loss(pred.float(), backbone.target(x0, noise, t).float())

            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            lr = lr_schedule.get_last_lr()[0]  # the rate this step used
            lr_schedule.step()
            with torch.no_grad():
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)  # ema += (1-d)(p - ema)

            window.append(loss.item())
            first_loss = window[0] if first_loss is None else first_loss
            if step % LOG_EVERY == 0 or step == cfg.steps:
                last_logged = float(np.mean(window))
                record = {"step": step, "loss": last_logged, "lr": lr, "seconds": time.perf_counter() - start}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{last_logged:.4f}")
                window = []
            bar.update(1)
            if progress is not None:
                progress(step, cfg.steps)
    bar.close()
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    seconds = time.perf_counter() - start
    return {
        "first_loss": first_loss,
        "final_loss": last_logged,
        "train_seconds": seconds,
        "seconds_per_step": seconds / cfg.steps,
        "trainable_parameters": sum(p.numel() for p in params),
    }


# ------------------------------------------------------------------------------------ evaluation


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of (N, 3) colours (any scale); 0 for greys."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    top, chroma = rgb.max(axis=1), np.ptp(rgb, axis=1)
    c = np.where(chroma > 0, chroma, 1.0)
    h = np.where(top == r, ((g - b) / c) % 6.0, np.where(top == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return np.where(chroma > 0, 60.0 * h, 0.0)


COLOUR_NAMES = tuple(COLOURS)
SHAPE_NAMES = tuple(SHAPES)
_REFERENCE_HUES = _hue(np.array([COLOURS[c] for c in COLOUR_NAMES]))


def _object_mask(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) -> (pixels float (N, H, W, 3), soft object mask (N, H, W)) as
    :func:`measure_attributes` finds it: distance to the median border colour, ramped over MASK_LOW..MASK_HIGH."""
    x = images.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    background = np.median(border, axis=1)  # (N, 3)
    distance = np.linalg.norm(x - background[:, None, None, :], axis=-1)  # (N, H, W)
    return x, np.clip((distance - MASK_LOW) / (MASK_HIGH - MASK_LOW), 0.0, 1.0)


def object_colours(images: np.ndarray) -> list[str | None]:
    """The world colour nearest in hue to each image's object (None: no object or a grey one)."""
    x, weight = _object_mask(images)
    mass = weight.sum(axis=(1, 2))
    mean = (weight[..., None] * x).sum(axis=(1, 2)) / np.maximum(mass, 1e-6)[:, None]  # (N, 3)
    gap = np.abs(_hue(mean)[:, None] - _REFERENCE_HUES[None, :])  # (N, colours)
    nearest = np.minimum(gap, 360.0 - gap).argmin(axis=1)
    valid = (mass >= MIN_OBJECT_PIXELS) & (np.ptp(mean, axis=1) >= MIN_CHROMA)
    return [COLOUR_NAMES[k] if ok else None for k, ok in zip(nearest, valid, strict=True)]


def _coverage(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> how much of each pixel the object covers, (N, H, W) in [0, 1].

    Each pixel is projected on the line from the background colour (median border pixel) to the
    object colour (mean offset of the pixels at least 80% as far from the background as the farthest):
    for a rendered image this undoes the anti-aliasing blend exactly (up to JPEG noise).
    """
    x = images.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    offset = x - np.median(border, axis=1)[:, None, None, :]  # (N, H, W, 3)
    distance = np.linalg.norm(offset, axis=-1)  # (N, H, W)
    far = distance >= 0.8 * distance.max(axis=(1, 2), keepdims=True)
    fill = (offset * far[..., None]).sum(axis=(1, 2)) / np.maximum(far.sum(axis=(1, 2)), 1)[:, None]  # (N, 3)
    cover = (
        np.einsum("nhwc,nc->nhw", offset, fill) / np.maximum((fill * fill).sum(axis=1), 1e-6)[:, None, None]
    )
    has_object = distance.max(axis=(1, 2)) >= MASK_HIGH
    return np.where(has_object[:, None, None], np.clip(cover, 0.0, 1.0), 0.0)


def object_shapes(images: np.ndarray) -> list[str | None]:
    """The world shape that, drawn at the object's area and centroid, best overlaps its coverage
    (soft intersection over union); None without an object. uint8 (N, R, R, 3)."""
    cover = _coverage(images)  # (N, H, W)
    n, h, w = cover.shape
    area = cover.sum(axis=(1, 2))
    centre_x = (cover * ((np.arange(w) + 0.5) / w)).sum(axis=(1, 2)) / np.maximum(area, 1e-6)
    styles = np.zeros((n, len(ATTRIBUTES)))  # latents that reproduce the measured area and position
    for name, value in (("size", area / (h * w)), ("position", centre_x)):
        centre, scale = STYLE_RENDERING[name]
        styles[:, ATTRIBUTES.index(name)] = (value - centre) / scale
    overlap = []
    for shape in SHAPE_NAMES:
        template = _coverage(render_images([f"a red {shape}"] * n, styles, image_size=h))
        union = np.maximum(cover, template).sum(axis=(1, 2))
        overlap.append(np.minimum(cover, template).sum(axis=(1, 2)) / np.maximum(union, 1e-6))
    best = np.stack(overlap, axis=1).argmax(axis=1)  # (N,)
    return [SHAPE_NAMES[k] if a >= MIN_OBJECT_PIXELS else None for k, a in zip(best, area, strict=True)]


def content_accuracy(images: np.ndarray, captions: list[str]) -> dict:
    """Shares of images whose object has the caption's colour, its shape, and both; colour per caption colour."""
    wanted = [caption_content(c) for c in captions]
    colour = np.array([a == b for a, (b, _) in zip(object_colours(images), wanted, strict=True)])
    shape = np.array([a == b for a, (_, b) in zip(object_shapes(images), wanted, strict=True)])
    present = {c for c, _ in wanted}
    by_colour = {c: float(colour[[w == c for w, _ in wanted]].mean()) for c in COLOUR_NAMES if c in present}
    return {
        "colour_accuracy": float(colour.mean()),
        "shape_accuracy": float(shape.mean()),
        "content_accuracy": float((colour & shape).mean()),
        "colour_accuracy_by_colour": by_colour,
    }


def _attribute_match(samples: np.ndarray, train: np.ndarray) -> dict:
    """Per attribute: mean and std of measure_attributes over samples and training images."""
    s, t = measure_attributes(samples), measure_attributes(train)
    out = {}
    for i, name in enumerate(ATTRIBUTES):
        std = float(t[:, i].std())
        out[name] = {
            "train_mean": float(t[:, i].mean()),
            "train_std": std,
            "sample_mean": float(s[:, i].mean()),
            "sample_std": float(s[:, i].std()),
            "mean_gap_in_train_std": float((s[:, i].mean() - t[:, i].mean()) / max(std, 1e-9)),
        }
    return out


def evaluate(
    backbone: ToyBackbone,
    captions: list[str],
    images: torch.Tensor,
    out_dir: Path,
    per_caption: int = EVAL_PER_CAPTION,
    steps: int = EVAL_STEPS,
) -> dict:
    """Sample ``per_caption`` images for each eval caption, write ``samples.png`` and ``eval.json``."""
    present = set(captions)
    world = [c for c in CAPTIONS if c in present]  # synthetic-world captions: colour and shape are checkable
    if world:
        eval_captions = world[:MAX_EVAL_CAPTIONS]
    else:  # real captions: the most frequent ones, no content check
        counts = {c: 0 for c in present}
        for c in captions:
            counts[c] += 1
        eval_captions = sorted(present, key=lambda c: (-counts[c], c))[:MAX_EVAL_CAPTIONS]
    seeds = [EVAL_SEED + j for j in range(per_caption)]
    all_captions = [c for c in eval_captions for _ in seeds]
    samples = to_uint8(
        sample(backbone, all_captions, seeds * len(eval_captions), steps=steps, guidance=EVAL_GUIDANCE)
    )
    save_grid(samples, len(eval_captions), per_caption, out_dir / "samples.png", scale=GRID_SCALE)

    train = images.numpy()
    result: dict = {
        "captions": eval_captions,
        "seeds": seeds,
        "steps": steps,
        "guidance": EVAL_GUIDANCE,
        "samples": len(samples),
        "colour_accuracy": None,
        "shape_accuracy": None,
        "content_accuracy": None,
        "colour_accuracy_by_colour": None,
        "train": None,  # the same checks on the training images: the ceiling of the pixel tests
        "attributes": _attribute_match(samples, train),
    }
    if world:
        result.update(content_accuracy(samples, all_captions))
        on_world = [i for i, c in enumerate(captions) if c in CAPTIONS]
        reference = content_accuracy(train[on_world], [captions[i] for i in on_world])
        result["train"] = {k: v for k, v in reference.items() if k != "colour_accuracy_by_colour"}
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------ stage


def pretrain(
    cfg: PretrainConfig,
    backbone_cfg: BackboneConfig,
    ingest_dir: Path,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    *,
    eval_per_caption: int = EVAL_PER_CAPTION,
    eval_steps: int = EVAL_STEPS,
) -> dict:
    """Train the toy backbone on ``ingest_dir``'s images, save it to ``out_dir/backbone``, evaluate; return counts."""
    if backbone_cfg.kind != "toy":
        raise ConfigError(
            f"the pretrain stage builds the toy backbone; backbone.kind is {backbone_cfg.kind!r}"
        )
    if backbone_cfg.prediction_type == "epsilon":
        raise ConfigError(
            "the toy backbone is v-prediction (epsilon gave grainy images: the toy-world measurements)"
        )
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    captions, images = training_examples(Path(ingest_dir), backbone_cfg.resolution)

    backbone = ToyBackbone.create(cfg, backbone_cfg.resolution, seed=cfg.seed)
    trained = _train(backbone, cfg, captions, images, out_dir / "metrics.jsonl", progress)
    backbone.save(out_dir / "backbone")

    saved = ToyBackbone.load(out_dir / "backbone")  # evaluate exactly what downstream stages load
    result = evaluate(saved, captions, images, out_dir, per_caption=eval_per_caption, steps=eval_steps)
    gaps = {name: round(a["mean_gap_in_train_std"], 4) for name, a in result["attributes"].items()}
    return {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "examples": len(captions),
        "captions": len(set(captions)),
        **trained,
        "colour_accuracy": result["colour_accuracy"],
        "shape_accuracy": result["shape_accuracy"],
        "content_accuracy": result["content_accuracy"],
        "attribute_mean_gap_in_train_std": gaps,
        "weights_digest": saved.identity()["weights_digest"],
        "seconds": time.perf_counter() - start,
    }

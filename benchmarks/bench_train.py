"""Training-step throughput: our step vs a reference-style loop, on the same model in one run.

Ours: x0 and text states from the latent cache, the DPO reference is the same network with the user
branch off. Reference-style (the Diffusion-DPO scripts' shape): every step decodes the JPEGs,
re-encodes images (VAE for SD) and captions, and runs a second, deep-copied reference UNet.
Both run the identical objective (ppd_core.train.objectives: the ppd objective) on the same pairs, noise and
timesteps. Backbones: the toy pixel model and a tiny SD 1.x checkpoint (VAE + CLIP in the loop).
Also reported: peak RSS, and the share of step time spent outside the model (data loading).
Writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from ppd_core import pipeline
from ppd_core.config import BackboneConfig, load_config
from ppd_core.data.images import ImageStore
from ppd_core.manifest import atomic_write_json
from ppd_core.models.factory import load_backbone
from ppd_core.train.cache import cache_latents
from ppd_core.train.losses import diffusion_dpo_loss, per_sample_mse
from ppd_core.train.objectives import OBJECTIVES
from ppd_core.train.worker import TrainData

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def _peak_rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def measure(backbone, dirs: dict, cache_dir: Path, steps: int, pairs: int, beta: float) -> dict:
    spec = {
        "dirs": {
            "fewshot": str(dirs["fewshot"]),
            "cache_latents": str(cache_dir),
            "embed": str(dirs["embed"]),
        },
        "embedder": "truth",
    }
    device = torch.device("cpu")
    data = TrainData(spec, OBJECTIVES["ppd"], device)
    reference_unet = copy.deepcopy(backbone.denoiser).requires_grad_(
        False
    )  # the reference-style second model
    adapter = backbone.new_adapter(data.embedding_shape, num_tokens=4)
    backbone.install_adapter(adapter)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    store = ImageStore(Path(dirs["ingest"]) / "images")
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(data.pairs), pairs, replace=False) for _ in range(steps + 1)]

    def ours(idx, g):
        t0 = time.perf_counter()
        x0, text, emb = data.batch(idx)
        t1 = time.perf_counter()
        loss, _ = OBJECTIVES["ppd"].loss(backbone, adapter, x0, text, emb, beta, g, 0.0, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return t1 - t0

    def reference_style(idx, g):
        t0 = time.perf_counter()
        rows = [data.pairs[i] for i in idx]
        uids = [r["winner_uid"] for r in rows] + [r["loser_uid"] for r in rows]
        size = getattr(backbone, "resolution", None)
        images = torch.from_numpy(np.ascontiguousarray(store.get_array(uids, size=size)))
        t1 = time.perf_counter()
        x0 = backbone.encode_images(images, generator=g)  # re-encoded every step
        text = backbone.encode_prompt([r["caption"] or "" for r in rows] * 2)
        emb = data.condition(rows)
        p = len(rows)
        noise = torch.randn((p, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        t = backbone.sample_timesteps(p, generator=g).repeat(2)
        x_t, target = backbone.add_noise(x0, noise, t), backbone.target(x0, noise, t)
        tokens, scale = adapter.condition(emb.repeat(2, *([1] * (emb.ndim - 1))), 1.0)
        model_mse = per_sample_mse(backbone.denoise(x_t, t, text, tokens, scale), target)
        with torch.no_grad():
            ref_mse = per_sample_mse(reference_unet(x_t, t, encoder_hidden_states=text).sample, target)
        loss = diffusion_dpo_loss(model_mse, ref_mse, beta).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return t1 - t0

    results = {}
    for name, fn in (("ours", ours), ("reference_style", reference_style), ("ours_again", ours)):
        fn(batches[0], torch.Generator().manual_seed(0))  # warm-up
        start, outside = time.perf_counter(), 0.0
        for s in range(steps):
            outside += fn(batches[s + 1], torch.Generator().manual_seed(s))
        total = time.perf_counter() - start
        results[name] = {
            "pairs_per_s": round(steps * pairs / total, 2),
            "step_s": round(total / steps, 4),
            "data_share": round(outside / total, 4),
        }
    ours_rate = (results["ours"]["pairs_per_s"] + results["ours_again"]["pairs_per_s"]) / 2
    return {
        **results,
        "ours_over_reference_style": round(ours_rate / results["reference_style"]["pairs_per_s"], 3),
        "rss_mib_after": round(_peak_rss_mib(), 1),
        "parameters_trainable": sum(p.numel() for p in adapter.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = {"benchmark": "train", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    out["setup"] = {
        "steps": args.steps,
        "pairs_per_step": args.pairs,
        "objective": "Diffusion-DPO, user-conditioned (ppd)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"run.root={tmp}",
                "embed.embedders=[{name: truth, kind: true_preference}]",
                "embed.default=truth",
                "pretrain.steps=5",
            ],
            environ={},
        )
        outcomes = pipeline.run_stages(cfg, ["cache_latents", "embed"])
        dirs = {k: v.directory for k, v in outcomes.items()}
        toy = load_backbone(cfg.backbone, dirs["pretrain"])
        out["toy"] = measure(toy, dirs, dirs["cache_latents"], args.steps, args.pairs, beta=100.0)
        from ppd_core.models.sd import build_tiny_sd

        sd_dir = Path(tmp) / "tiny_sd"
        build_tiny_sd(sd_dir)
        sd = load_backbone(BackboneConfig(kind="sd", model=str(sd_dir), resolution=32))
        sd_cache = Path(tmp) / "sd_cache"
        sd_cache.mkdir()
        cache_latents(sd, dirs["ingest"], dirs["fewshot"], sd_cache)
        out["tiny_sd"] = measure(sd, dirs, sd_cache, args.steps, args.pairs, beta=2500.0)
    out["targets"] = {
        "ours_over_reference_style_at_least": 2.0,
        "data_share_below": 0.10,
        "met": {
            k: {
                "speed": out[k]["ours_over_reference_style"] >= 2.0,
                "data": out[k]["ours"]["data_share"] < 0.10,
            }
            for k in ("toy", "tiny_sd")
        },
    }
    atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

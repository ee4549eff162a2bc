"""GPU check (`make gpu-check`): train the SD backbone's user adapter for a few steps through DeepSpeed
(ZeRO-2, bf16) on one CUDA device and print pairs/s and peak GPU memory. Never part of `make test`.

No weights are downloaded: the script builds a checkpoint with Stable Diffusion 1.5's architecture
(UNet 860M, VAE, 12-layer CLIP text encoder) and random weights, saves it in the real diffusers layout
and loads it back through the same SDBackbone / from_pretrained path a real checkpoint takes, so the
throughput and memory are those of SD 1.5 at the chosen resolution. User embeddings have the paper's
shape (29 x 3584, LLaVA-OneVision-7B hidden states; the adapter reads the last row).

``--tiny`` runs the same code on the tiny test checkpoint (CPU is fine): a dry run of the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_sd15_random(out_dir: Path, seed: int = 0) -> Path:
    """SD 1.5's architecture with random weights, saved as a diffusers pipeline directory."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ppd_core.models.text import build_offline_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_offline_clip_tokenizer(tmp)
        sched = DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--tiny", action="store_true", help="dry run on the tiny test checkpoint")
    ap.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the reference-style loop (re-encode every step, a copied reference UNet)",
    )
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")) / "gpu_check.json"
    )
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu-check: no CUDA device here; nothing to measure (use --tiny for a CPU dry run)")
        return
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))

    import deepspeed

    from ppd_core.config import load_config
    from ppd_core.models.factory import load_backbone
    from ppd_core.train.objectives import OBJECTIVES
    from ppd_core.train.worker import ds_config

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda:0" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.tiny:
            from ppd_core.models.sd import build_tiny_sd

            ckpt, resolution = build_tiny_sd(Path(tmp) / "sd"), 32
        else:
            ckpt, resolution = build_sd15_random(Path(tmp) / "sd"), args.resolution
        report["build_and_save_s"] = round(time.perf_counter() - t0, 1)
        cfg = load_config(
            None,
            [
                "backbone.kind=sd", f"backbone.model={ckpt}", f"backbone.resolution={resolution}",
                f"backbone.dtype={'bfloat16' if cuda else 'float32'}", f"train.precision={precision}",
                "train.zero_stage=2", "train.lr=1e-5", f"train.pairs_per_step={args.pairs}", "adapter.rows=last",
            ],
            environ={},
        )  # fmt: skip
        t0 = time.perf_counter()
        backbone = load_backbone(cfg.backbone, device=device)
        report["load_s"] = round(time.perf_counter() - t0, 1)
    p = args.pairs
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # the latent/text cache's work, done once
        images = torch.randint(
            0,
            256,
            (2 * p, resolution, resolution, 3),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(0),
        )
        x0 = backbone.encode_images(images.to(device), generator=g)
        text = backbone.encode_prompt([f"a photo of object {i}" for i in range(p)] * 2)
    embedding_shape = (29, 3584) if not args.tiny else (3, 16)
    emb = torch.randn((p, *embedding_shape), generator=g, device=device)
    # the reference-style loop's second model: a frozen copy of the UNet, taken before the adapter goes in
    reference_unet = copy.deepcopy(backbone.denoiser).requires_grad_(False) if args.compare else None
    adapter = backbone.new_adapter(embedding_shape, num_tokens=4, rows="last")
    backbone.install_adapter(adapter)
    engine, _, _, _ = deepspeed.initialize(
        model=adapter, model_parameters=list(adapter.parameters()), config=ds_config(cfg, p)
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> float:
        gen = torch.Generator(device=device).manual_seed(i)
        loss, m = OBJECTIVES["ppd"].loss(
            backbone,
            engine.module,
            x0,
            text,
            emb.to(next(engine.module.parameters()).dtype),
            2500.0,
            gen,
            0.1,
            1.0,
        )
        engine.backward(loss)
        engine.step()
        return m["loss"]

    captions = [f"a photo of object {i}" for i in range(p)] * 2

    def reference_step(i: int) -> float:
        """A reference-style step: images and captions re-encoded every step, a second (copied) UNet as
        the DPO reference; the same adapter, loss and optimizer."""
        from ppd_core.train.losses import diffusion_dpo_loss, per_sample_mse

        gen = torch.Generator(device=device).manual_seed(i)
        with torch.no_grad():
            x0_i = backbone.encode_images(images.to(device), generator=gen)  # VAE every step
            text_i = backbone.encode_prompt(captions)
        noise = torch.randn((p, *x0_i.shape[1:]), generator=gen, device=device).repeat(2, 1, 1, 1)
        t = backbone.sample_timesteps(p, generator=gen).repeat(2)
        x_t, target = backbone.add_noise(x0_i, noise, t), backbone.target(x0_i, noise, t)
        dtype = next(engine.module.parameters()).dtype
        tokens, scale = engine.module.condition(emb.repeat(2, 1, 1).to(dtype), 1.0)
        model_mse = per_sample_mse(backbone.denoise(x_t, t, text_i, tokens, scale), target)
        with torch.no_grad():
            unet_dtype = next(reference_unet.parameters()).dtype
            ref = reference_unet(x_t.to(unet_dtype), t, encoder_hidden_states=text_i.to(unet_dtype)).sample
            ref_mse = per_sample_mse(ref, target)
        loss = diffusion_dpo_loss(model_mse, ref_mse, 2500.0).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    def timed(fn, start: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            fn(start + i)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = [step(i) for i in range(3)]
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step(3 + i) for i in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    if args.compare:
        reference_step(100)  # warm-up
        reference_s = timed(reference_step, 200)
        ours_again_s = timed(step, 300)  # ours again: the machine's drift shows up here
        ours_s = (seconds + ours_again_s) / 2
        report.update(
            reference_style_step_s=round(reference_s / args.steps, 4),
            ours_again_step_s=round(ours_again_s / args.steps, 4),
            ours_over_reference_style=round(reference_s / ours_s, 3),
        )
    report.update(
        resolution=resolution,
        latent_shape=list(x0.shape[1:]),
        pairs_per_step=p,
        precision=precision,
        zero_stage=2,
        unet_parameters_m=round(sum(t.numel() for t in backbone.denoiser.parameters()) / 1e6, 1),
        adapter_parameters_m=round(sum(t.numel() for t in adapter.parameters()) / 1e6, 2),
        first_losses=[round(x, 5) for x in first],
        last_loss=round(losses[-1], 5),
        step_s=round(seconds / args.steps, 4),
        pairs_per_s=round(args.steps * p / seconds, 2),
        peak_gpu_memory_gib=peak,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

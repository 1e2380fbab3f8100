"""Rendering throughput: our render stage vs a bare diffusers call, and what speeds up an image-voting round.

    python benchmarks/bench_render.py                 # GPU: SDXL-Turbo-sized pipeline, random weights
    python benchmarks/bench_render.py --tiny --device cpu   # the same code on a tiny pipeline (CPU check)

SDXL-Turbo's real weights cannot be fetched here, so the pipeline is built from SDXL's architecture
with random weights: the compute per image is the same. Measurements (images/s, GPU memory):
1. ``DiffusersImageGenerator.generate`` vs ``pipe(prompt=[...])`` at the same batch, steps, size, seeds
   (bar: ours ≥ 0.95× bare);
2. one image-voting round (14,000 renders) under variants: channels-last, 256² renders (Inception
   features use 256² anyway), fewer steps, a tiny autoencoder for decodes, torch.compile;
3. the ×4 Real-ESRGAN upscaler (RRDBNet x4plus size, random weights) and Lanczos.
Without a CUDA device (and without --tiny) it prints a skip message.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine

ROUND = 14_000


def build_sdxl_sized(path: str, device: str) -> str:
    """SDXL-Turbo architecture (UNet 2.6B, CLIP-L + bigG text encoders, SDXL VAE), random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from spti.testing.tiny_vision import build_tiny_sd_pipeline

    tok_dir = os.path.join(path, "_tok")
    build_tiny_sd_pipeline(tok_dir)  # only its CLIPTokenizer is reused: the cost is in the networks
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer"))
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=1024,
            scaling_factor=0.13025,
        )
        vocab = tokenizer.vocab_size
        te1 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
            )
        )
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
            )
        )
    scheduler = EulerAncestralDiscreteScheduler(timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    out = os.path.join(path, "sdxl-turbo-sized")
    pipe.to(torch.float16).save_pretrained(out)
    return out


def build_tiny_vae(path: str) -> str:
    from spti.testing.tiny_vision import build_tiny_autoencoder

    return str(build_tiny_autoencoder(os.path.join(path, "taesd")))


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny pipeline (checks the code path on CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skip: no CUDA device on this machine (run with --tiny --device cpu to check the code path)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from spti.backends.local.images import DiffusersImageGenerator
    from spti.backends.local.upscale import LanczosUpscaler, RealESRGANUpscaler
    from spti.testing.tiny_vision import build_tiny_sdxl_pipeline, write_tiny_realesrgan_weights

    mach = machine()
    size, small, steps = (64, 32, 2) if args.tiny else (512, 256, 4)
    batch = min(args.batch, 4) if args.tiny else args.batch
    prompts = [f"a photo of a bedroom number {i} with a large window" for i in range(batch)]
    seeds = list(range(batch))
    with tempfile.TemporaryDirectory() as tmp:
        path = (
            str(build_tiny_sdxl_pipeline(os.path.join(tmp, "sdxl")))
            if args.tiny
            else build_sdxl_sized(tmp, args.device)
        )
        dtype = "fp32" if args.device == "cpu" else "fp16"
        ours = DiffusersImageGenerator(
            path, device=args.device, dtype=dtype, batch_size=batch, steps=steps, guidance=0.0
        )
        pipe = ours.pipe

        def bare() -> None:
            gens = [torch.Generator(args.device).manual_seed(s) for s in seeds]
            pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=0.0, height=size, width=size, generator=gens)

        def run_ours(sz: int = size, st: int = steps, gen=ours) -> None:  # type: ignore[no-untyped-def]
            gen.generate(prompts, seeds=seeds, width=sz, height=sz, steps=st, guidance=0.0)

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t_bare, t_ours = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternate, so machine noise hits both alike
            t_bare = min(t_bare, timed(bare, 1))
            t_ours = min(t_ours, timed(run_ours, 1))
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(
            {
                "bench": "render",
                "machine": mach,
                "what": "render stage vs bare diffusers",
                "size": size,
                "steps": steps,
                "batch": batch,
                "ours_images_per_s": batch / t_ours,
                "bare_images_per_s": batch / t_bare,
                "throughput_ratio": t_bare / t_ours,
                "bar": 0.95,
                "gpu_peak_gib": mem,
                "tiny": args.tiny,
            }
        )

        # one voting round under variants (each relative to the 512², 4-step baseline)
        base_s = t_ours / batch
        variants = [
            ("baseline", lambda: run_ours()),
            (f"{small}² renders", lambda: run_ours(small)),
            (f"{small}², 2 steps", lambda: run_ours(small, max(1, steps // 2))),
            (f"{small}², 1 step", lambda: run_ours(small, 1)),
        ]
        for name, fn in variants:
            s = timed(fn, args.repeats) / batch
            emit(
                {
                    "bench": "voting_round",
                    "machine": mach,
                    "variant": name,
                    "images_per_s": 1 / s,
                    "round_minutes": ROUND * s / 60,
                    "speedup": base_s / s,
                    "tiny": args.tiny,
                }
            )
        for name, kwargs in (
            ("channels-last", {"channels_last": True}),
            ("tiny autoencoder", {"tiny_autoencoder": build_tiny_vae(tmp)}),
            ("torch.compile", {"compile": True}),
        ):
            if name == "torch.compile" and args.device == "cpu":
                continue
            variant = DiffusersImageGenerator(
                path, device=args.device, dtype=dtype, batch_size=batch, steps=steps, guidance=0.0, **kwargs
            )
            s = timed(lambda v=variant: run_ours(small, steps, v), args.repeats) / batch
            emit(
                {
                    "bench": "voting_round",
                    "machine": mach,
                    "variant": f"{small}² + {name}",
                    "images_per_s": 1 / s,
                    "round_minutes": ROUND * s / 60,
                    "speedup": base_s / s,
                    "tiny": args.tiny,
                }
            )
            del variant

        # upscaling ×4
        images = pipe(prompt=prompts[:4], num_inference_steps=1, guidance_scale=0.0, height=size, width=size).images
        full = {} if args.tiny else {"num_feat": 64, "num_grow_ch": 32}  # x4plus: 23 blocks, 64 feats, 32 growth
        weights = write_tiny_realesrgan_weights(
            os.path.join(tmp, "esrgan"), num_blocks=2 if args.tiny else 23, **full
        ).safetensors
        for name, up in (
            ("lanczos x4", LanczosUpscaler(scale=4)),
            ("real-esrgan x4plus", RealESRGANUpscaler(str(weights), scale=4, device=args.device)),
        ):
            s = timed(lambda u=up: u.upscale(images), args.repeats) / len(images)
            emit(
                {
                    "bench": "upscale",
                    "machine": mach,
                    "upscaler": name,
                    "input": size,
                    "output": size * 4,
                    "images_per_s": 1 / s,
                    "tiny": args.tiny,
                }
            )


if __name__ == "__main__":
    main()

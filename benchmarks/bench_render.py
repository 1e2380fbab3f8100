"""Rendering throughput: our render stage vs a bare diffusers call, and what speeds up an image-voting round.

    python benchmarks/bench_render.py                 # GPU: SDXL-Turbo-sized pipeline, random weights
    python benchmarks/bench_render.py --tiny --device cpu   # the same code on a tiny pipeline (CPU check)
    python benchmarks/bench_render.py --executor ray        # images/s on 1, 2, 4, … GPUs through Ray actors
    python benchmarks/bench_render.py --executor ray --tiny --device cpu   # that path with 2 CPU actors

SDXL-Turbo's real weights cannot be fetched here, so the pipeline is built from SDXL's architecture
with random weights: the compute per image is the same. Measurements (images/s, GPU memory):
1. ``DiffusersImageGenerator.generate`` vs ``pipe(prompt=[...])`` at the same batch, steps, size, seeds
   (bar: ours ≥ 0.95× bare);
2. one image-voting round (14,000 renders) under variants: channels-last, 256² renders (Inception
   features use 256² anyway), fewer steps, a tiny autoencoder for decodes, torch.compile;
3. the ×4 Real-ESRGAN upscaler (RRDBNet x4plus size, random weights) and Lanczos.
With ``--executor ray``: vote renders through the Ray executor (:mod:`spti.executors`) on one machine,
with 1, 2, 4, … actors (one GPU each; ``--workers`` to choose), images/s and scaling efficiency
(images/s with n ÷ n × images/s with one), and the executor's overhead against the same calls in
process (``LocalExecutor``). ``--tiny --device cpu`` runs that path on 2 CPU actors.
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


def bench_ray(args: argparse.Namespace) -> None:
    """Vote renders through the Ray executor with 1, 2, 4, … actors on this machine: images/s and scaling."""
    import importlib.util

    import torch

    if importlib.util.find_spec("ray") is None:
        print("skip: ray is not installed (pip install 'spti[ray]')")
        return
    import ray

    from spti.config import resolve_config
    from spti.executors import LocalExecutor, RoleSpec
    from spti.executors.proxies import ImageGeneratorProxy
    from spti.executors.ray_executor import RayExecutor
    from spti.testing.tiny_vision import build_tiny_sdxl_pipeline

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    slots = gpus or 2  # the CPU check: 2 CPU actors
    counts = [int(n) for n in args.workers.split(",")] if args.workers else _doublings(slots)
    counts = [n for n in counts if n <= slots]
    size, steps = (64, 2) if args.tiny else (512, 4)
    batch = min(args.batch, 4) if args.tiny else args.batch
    per_worker = args.batches * batch  # images each actor draws in a timed pass
    mach = machine()
    with tempfile.TemporaryDirectory() as tmp:
        # built on the CPU, so that the driver holds no GPU: every GPU goes to an actor
        path = str(build_tiny_sdxl_pipeline(os.path.join(tmp, "sdxl"))) if args.tiny else build_sdxl_sized(tmp, "cpu")
        cfg = resolve_config(
            preset="quick",
            overrides={
                "image_model": path,
                "device": "cpu" if not gpus else "cuda",
                "dtype": "fp32" if not gpus else "fp16",
                "batch_size": batch,
                "steps": steps,
                "guidance": 0.0,
            },
        )
        role = RoleSpec.of("image", cfg)

        def draw(executor, n_images: int, tag: str) -> float:  # type: ignore[no-untyped-def]
            gen = ImageGeneratorProxy(executor, role, chunk=batch)
            prompts = [f"a photo of a bedroom number {i} with a large window, {tag}" for i in range(n_images)]
            gen.generate(prompts[: batch * executor.workers], width=size, height=size, steps=steps)  # load, warm up
            t = time.perf_counter()
            gen.generate(prompts, seeds=list(range(n_images)), width=size, height=size, steps=steps)
            return n_images / (time.perf_counter() - t)

        if not gpus:
            torch.set_num_threads(1)  # as each CPU actor (num_cpus=1): the in-process baseline is one slot too
        local = LocalExecutor()
        in_process = draw(local, per_worker, "in process")
        local.close()
        ray.init(num_cpus=max(2, slots), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        try:
            rates: dict[int, float] = {}
            for n in counts:
                executor = RayExecutor(workers=n)
                try:
                    rates[n] = draw(executor, n * per_worker, f"{n} workers")
                finally:
                    executor.close()
                emit(
                    {
                        "bench": "render_ray",
                        "machine": mach,
                        "device": f"{n} x GPU" if gpus else f"{n} x CPU actor",
                        "workers": n,
                        "size": size,
                        "steps": steps,
                        "batch": batch,
                        "images": n * per_worker,
                        "images_per_s": rates[n],
                        "speedup": rates[n] / rates[counts[0]] * counts[0],
                        "scaling_efficiency": rates[n] / (n * rates[counts[0]] / counts[0]),
                        "in_process_images_per_s": in_process,
                        "ray_over_in_process": rates[n] / (n * in_process),
                        "tiny": args.tiny,
                    }
                )
        finally:
            ray.shutdown()


def _doublings(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    if out[-1] != limit:
        out.append(limit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny pipeline (checks the code path on CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--executor", choices=("local", "ray"), default="local", help="ray: the multi-GPU mode")
    ap.add_argument(
        "--workers", default="", help="--executor ray: actor counts to measure, e.g. 1,2,4 (default 1, 2, 4, … all)"
    )
    ap.add_argument("--batches", type=int, default=4, help="--executor ray: timed batches per actor")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skip: no CUDA device on this machine (run with --tiny --device cpu to check the code path)")
        return
    if args.executor == "ray":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        bench_ray(args)
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

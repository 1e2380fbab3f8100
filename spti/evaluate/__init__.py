"""``spti evaluate``: how close the release is to the private data, for the data owner only.

Every number here is computed from the private images and captions *outside* any DP mechanism.
The results are therefore NOT differentially private: they are written under ``run/private/``
(``evaluation.json``, ``evaluation.html``), every output says so, and nothing is written to
``run/release/`` (whose ``report.html`` must stay free of non-DP numbers). Sharing an FID is
usually harmless in practice, but it is a statistic of the private set and no guarantee covers it.

Metrics (each reports its sample counts and the feature extractor next to its number):

- ``fid``: Fréchet distance in FID Inception-v3 pool3 space (2048-d, fp32 features, float64
  statistics). Needs the published network: pytorch-fid's ``.pth`` state dict or the TorchScript
  ``inception-2015-12-05.pt`` of StyleGAN / clean-fid; never computed with anything else.
- ``fd-dinov2`` / ``fd-clip``: the same distance in DINOv2 CLS / CLIP image-embedding space.
- ``precision-recall``: improved precision/recall (k-NN manifolds) plus nearest-neighbour distances
  from each released image to the private set (a copy check), in DINOv2 space by default.
- ``clip-score``: how well each released image shows its released description (CLIP text ↔ image),
  with the private images ↔ their captions as a reference when captions exist.
- ``wavelet``: wavelet energy spectra of private vs released images at a common size; when the run
  upscaled, also model-upscaled vs a Lanczos upscale of the same images at full size.
- ``text-fd``: Fréchet distance between private-caption and released-description sentence
  embeddings, with length/vocabulary statistics of both.

Protocols: ``native`` (default) compares the images as they are; ``paper`` makes FID comparable with
the SPTI paper (both sides ``Resize(256) + CenterCrop(256)``, clean-fid's bicubic resize to 299, a
reference of up to 20,000 private images drawn from ``--seed``). When the PE loop wrote
``private/metrics_by_round.jsonl``, the page also plots the voting-space Fréchet distance by round.

Models come from local folders or the Hugging Face cache; a hub id that is not cached is skipped at
once when offline (one line saying so), and a metric whose model cannot be loaded is reported as
unavailable with the reason while the others still run.

The parts: :mod:`.common` (names, constants), :mod:`.inputs` (the image sets), :mod:`.extract`
(feature extractors, protocol preprocessing, one pass over the images), :mod:`.text` (text
encoders), :mod:`.results` (one result per metric), :mod:`.rounds` (per-round metrics),
:mod:`.page` (the HTML page) and :mod:`.run` (:func:`evaluate_run`).
"""

from spti.evaluate.common import (
    DEFAULT_CLIP,
    DEFAULT_DINOV2,
    DEFAULT_TEXT_MODEL,
    IMAGE_METRICS,
    INCEPTION_FILE,
    METRICS,
    NOT_DP_WARNING,
    PAPER_REFERENCE_SIZE,
    PROTOCOLS,
    parse_metrics,
)
from spti.evaluate.page import headline, render_html
from spti.evaluate.rounds import ROUND_METRICS_FILE, read_round_metrics
from spti.evaluate.run import evaluate_run

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINOV2",
    "DEFAULT_TEXT_MODEL",
    "IMAGE_METRICS",
    "INCEPTION_FILE",
    "METRICS",
    "NOT_DP_WARNING",
    "PAPER_REFERENCE_SIZE",
    "PROTOCOLS",
    "ROUND_METRICS_FILE",
    "evaluate_run",
    "headline",
    "parse_metrics",
    "read_round_metrics",
    "render_html",
]

"""Memorisation, text-overlap and canary audits of a finished run. The results are NOT DP.

A DP guarantee is a statement about the mechanism; an audit looks at one output next to the data
it came from, to catch what the guarantee cannot show by itself: a bug that bypasses the noise, a
pretrained generator that already knew a private image, a caption copied into the release, or a
mechanism that leaks more than its claimed ε. Because an audit reads the private data and reports
on individual private items, everything it writes goes to ``RUN_DIR/private/`` (owner only), never
to ``release/``, and every output says so.

The package, along its seams: :mod:`~spti.audit.settings` (settings, constants),
:mod:`~spti.audit.images` (loading and embedding), :mod:`~spti.audit.nearest` (nearest neighbours
and the held-out reference), :mod:`~spti.audit.pixels` (pixel near-duplicates),
:mod:`~spti.audit.captions` (text overlap), :mod:`~spti.audit.canaries`, :mod:`~spti.audit.report`
(the JSON result and the HTML page) and :mod:`~spti.audit.run` (:func:`run_audit`).

Three checks:

- **Memorisation (images).** Every released image gets its nearest private images in two feature
  spaces (any :func:`~spti.backends.factory.build_image_embedder` spec) and in pixel space. The
  private set is split in two halves A/B by privacy unit with a public seed; the nearest-neighbour
  distance of each B image to A is the *fresh sample* reference (what a new draw from the data
  distribution, not in the reference set, looks like), and released → A is measured against the
  same reference set. Both folds are used (B→A and A→B), so a copy of any private image can be
  caught. A released image closer than the low reference percentile is flagged for review; the
  release as a whole is suspect when such images are significantly more frequent than the
  reference predicts (binomial test), and a one-sided Mann–Whitney and KS test say whether the
  released images are closer than fresh samples overall. The pixel check (grayscale thumbnails,
  normalised cross-correlation over small shifts) flags near-duplicates whatever the features.
- **Text overlap.** Released descriptions against private captions: the share of 4- and 8-grams
  found in any private caption, and for candidate pairs that share a rare n-gram the longest common
  substring in words and characters; verbatim and near-verbatim copies are flagged. The same
  measures of held-out private captions against the other half are the reference.
- **Canaries.** ``2K`` procedurally drawn canaries (saturated colour codes, unlike any photo); K of
  them, chosen at random, are planted into a copy of the private folder, and the pipeline is rerun
  with the run's configuration, once without canaries (control) and once with. A canary is *matched*
  when a released sample lies closer to it than any private image does. Planted vs held-out
  matches give a one-run membership test (Steinke, Nasr & Jagielski 2023) and an ε lower bound.
"""

from __future__ import annotations

from spti.audit.canaries import canary_image, one_run_epsilon_lower_bound, run_canary_audit
from spti.audit.captions import text_overlap
from spti.audit.images import _ImageSet, resolve_private_dir
from spti.audit.nearest import _feature_audit, split_units
from spti.audit.run import run_audit
from spti.audit.settings import CANARY_PREFIX, CANARY_RUN_OUTPUTS, NOT_DP_BANNER, NOT_DP_NOTE, AuditSettings

__all__ = [
    "CANARY_PREFIX",
    "CANARY_RUN_OUTPUTS",
    "NOT_DP_BANNER",
    "NOT_DP_NOTE",
    "AuditSettings",
    "_ImageSet",
    "_feature_audit",
    "canary_image",
    "one_run_epsilon_lower_bound",
    "resolve_private_dir",
    "run_audit",
    "run_canary_audit",
    "split_units",
    "text_overlap",
]

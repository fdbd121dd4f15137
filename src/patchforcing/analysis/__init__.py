"""The paper's three findings about the uncertainty head, measured on held-out data.

``analyze(model, data, out_dir)`` runs a PFT on held-out items at a list of times ``t`` and
measures (docs/method.md section 5):

(a) **Uncertainty vs error.** Every patch of every image at the same ``t`` (one fixed noise
    draw per image). Per patch: the *predicted uncertainty* ``mean over the p x p cell of
    exp(logvar)`` (the variance the samplers threshold, :func:`patch_uncertainty`) and the
    *actual error* ``mean over channels and the p x p cell of (v - u)^2``
    (:func:`patch_squared_error`). Pearson R between the two over all patches of all images,
    per ``t`` (also Spearman's rank correlation and Pearson R of the logs). The paper reports
    R = 0.52 at t = 0.6 and R = 0.11 at t = 0.2 on ImageNet 256.
(b) **Clean context.** A fixed random share of the patches of each image (the *context*,
    :func:`context_mask`) is moved closer to the data, to ``t_ctx = t + move * (1 - t)``
    (default ``move = 0.5``: half way) or to a fixed ``max(t, context_t)``
    (:func:`context_time`); the other patches stay at ``t`` with the same noise. The
    flow-matching loss and the mean predicted uncertainty are measured **on the non-context
    patches only**, with and without context ("without" = every patch at ``t``, the pass of (a)).
    The paper: more clean context lowers both.
(c) **Uncertainty histogram** of the non-context patches with and without context, log-spaced
    bins, pooled over all ``t`` (and per ``t`` in the JSON).

Writes ``analysis.json`` (every number, the settings and the paper's reference values),
``correlation.png`` (R vs t), ``scatter_t0.20.png`` ... (uncertainty vs error, log-log),
``context.png`` (loss and uncertainty vs t, with and without context) and
``uncertainty_hist.png``. Deterministic for a given ``seed``: noise and context patches depend
only on ``(seed, item index)``, never on the batch size.

Data (:func:`resolve_data`): ``synthetic`` (procedural shapes of a data seed no preset trains
on), a YAML config / preset (its ``data`` section; the trainer's held-out ``val_size`` split), an
image folder, an ``.npz`` of images, or a latent store made by ``patchforcing encode``; in
Python also a data set or a tensor. Latent models take latent data directly, or images encoded
by the model's autoencoder (posterior mean). Not supported: models without an uncertainty head
or without per-patch times (SiT).

Modules: :mod:`.stats` (correlations), :mod:`.data` (:func:`resolve_data`), :mod:`.measure`
(the forward passes), :mod:`.run` (:func:`analyze`, the summaries), :mod:`.report` (files, table).
"""

from .data import SYNTHETIC_HELD_OUT_SEED, resolve_data
from .measure import context_mask, context_time, patch_squared_error, patch_uncertainty
from .report import format_table
from .run import DEFAULT_T, PAPER_REFERENCE, analyze
from .stats import pearson_r, spearman_r

__all__ = [
    "DEFAULT_T",
    "PAPER_REFERENCE",
    "SYNTHETIC_HELD_OUT_SEED",
    "analyze",
    "context_mask",
    "context_time",
    "format_table",
    "patch_squared_error",
    "patch_uncertainty",
    "pearson_r",
    "resolve_data",
    "spearman_r",
]

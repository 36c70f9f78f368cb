"""Whether a bank may continue on a store whose arrays differ from the one it was built on.

The latent store is computed (audio rendered, encoded by the autoencoder, captions embedded), so another CPU
gives latents that differ in float rounding (float16 ulps) and a content hash that differs. A retrain on
that store, on that CPU, is another draw of the same retrain only if it differs from the recorded one by no
more than retraining noise does. The check refits finished LDS retrains (subset j, the bank's seed) on the
new store and compares, over subsets j and queries q,

    d_store(j, q) = L(z_q, theta_{-R_j}^{s0}; new store) - L(z_q, theta_{-R_j}^{s0}; recorded)
    d_seed(j, q)  = L(z_q, theta_{-R_j}^{s1}; recorded)  - L(z_q, theta_{-R_j}^{s0}; recorded)

    ratio = rms(d_store) / rms(d_seed)          accepted when ratio <= max_ratio (default 1)

(rms over every (j, q); the subsets must have both seeds recorded). Accepted, the bank keeps its own
identity (its retrains' names and keys use the content it was built on) and records the new content, the
ratio and the check's losses; each record names the store content it was fitted on.
"""
from __future__ import annotations

import math

import numpy as np


def store_check_stats(new: list[dict[str, float]], recorded: list[dict[str, float]],
                      other_seed: list[dict[str, float]], max_ratio: float = 1.0) -> dict:
    """The check's figures from per-subset query losses: the refit on the new store (``new``), the recorded
    retrain of the same seed (``recorded``) and of the second seed (``other_seed``), aligned by position."""
    if not new or len(new) != len(recorded) or len(new) != len(other_seed):
        raise ValueError("store check: needs the same number (>= 1) of refits, recorded and second-seed losses")
    d_store, d_seed = [], []
    for a, b, c in zip(new, recorded, other_seed):
        qs = sorted(set(a) & set(b) & set(c))
        if not qs:
            raise ValueError("store check: a refit shares no query with its recorded retrains")
        d_store += [a[q] - b[q] for q in qs]
        d_seed += [c[q] - b[q] for q in qs]
    ds, dn = np.asarray(d_store), np.asarray(d_seed)
    rms_store, rms_seed = float(np.sqrt(np.mean(ds ** 2))), float(np.sqrt(np.mean(dn ** 2)))
    ratio = rms_store / rms_seed if rms_seed > 0 else math.inf
    return {"pairs": len(ds), "subsets": len(new), "rms_store": rms_store, "rms_seed": rms_seed,
            "mean_store": float(ds.mean()), "max_abs_store": float(np.abs(ds).max()), "ratio": ratio,
            "max_ratio": float(max_ratio), "accepted": bool(ratio <= max_ratio)}

"""Figure 1 of the paper: unlearning vs similarity attribution-score profiles.

For each query the training items are sorted by the unlearning score (descending); the other
methods' scores are read for the same items. Each method's scores are normalised per query
(min-max on the left panel, softmax on the right panel with logarithmic axes) and the mean over
queries is drawn as a line with +-1 standard deviation shading.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from musicattr.evaluation.metrics import minmax_normalize, softmax_normalize

__all__ = ["figure1_curves", "plot_figure1"]


def figure1_curves(unlearning: Tensor, others: dict[str, Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """Per method (``"unlearning"`` first) and normalisation (``"minmax"``, ``"softmax"``): mean and
    std over queries of the normalised scores, in the unlearning order. Arrays of length N.

    Softmax is taken of the per-query standardised scores, softmax((s - mean) / std): raw unlearning
    scores (tiny loss differences) and cosine similarities (all near 1) would otherwise both give a
    flat 1/N, hiding the concentration the figure is about."""
    u = torch.as_tensor(unlearning).detach().cpu().double()
    if u.dim() == 1:
        u = u[None]
    order = torch.argsort(u, dim=1, descending=True, stable=True)
    methods = {"unlearning": u}
    for name, s in others.items():
        s = torch.as_tensor(s).detach().cpu().double()
        s = s[None] if s.dim() == 1 else s
        if s.shape != u.shape:
            raise ValueError(f"{name}: shape {tuple(s.shape)} != unlearning {tuple(u.shape)}")
        methods[name] = s
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, s in methods.items():
        s = torch.gather(s, 1, order)
        out[name] = {}
        z = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-30)
        for norm, v in (("minmax", minmax_normalize(s, dim=1)), ("softmax", softmax_normalize(z, dim=1))):
            out[name][norm] = np.stack([v.mean(0).numpy(), v.std(0, unbiased=False).numpy()])
    return out


def plot_figure1(unlearning: Tensor, others: dict[str, Tensor], out_png: str,
                 title: str = "Attribution scores sorted by unlearning score") -> str:
    """Draw Figure 1 from Tensor[Q, N] scores (unlearning and each other method) into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = figure1_curves(unlearning, others)
    n = next(iter(curves.values()))["minmax"].shape[1]
    x = np.arange(1, n + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        for ax, norm in zip(axes, ("minmax", "softmax")):
            mean, std = c[norm]
            line, = ax.plot(x, mean, label=name, lw=1.5)
            lo = mean - std
            if norm == "softmax":
                lo = np.maximum(lo, np.maximum(mean, 1e-300) * 1e-3)  # keep the band positive on log axes
            ax.fill_between(x, lo, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    axes[0].set_title("min-max normalised")
    axes[0].set_xlabel("training items (sorted by unlearning score)")
    axes[0].set_ylabel("normalised attribution score")
    axes[1].set_title("softmax normalised")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("training items (sorted by unlearning score)")
    axes[1].set_ylabel("softmax score")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png

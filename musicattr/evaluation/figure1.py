"""Figure 1 of the paper: unlearning vs similarity attribution-score profiles.

For each query the training items are sorted by the unlearning score (descending); the other
methods' scores are read for the same items. Each method's scores are normalised per query
(min-max on the left panel, softmax on the right panel with logarithmic axes) and the mean over
queries is drawn as a line with +-1 standard deviation shading.

The right panel differs from the paper by default, and says so in its title: the paper takes the
softmax of the scores themselves; here it is the softmax of the per-query standardised scores
(``softmax_of="zscore"``), because raw unlearning scores (loss differences of ~1e-5) and cosine
similarities (all near 1) both give a flat 1/N. ``softmax_of="raw"`` draws the paper's panel.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from musicattr.evaluation.metrics import minmax_normalize, softmax_normalize

__all__ = ["figure1_curves", "draw_figure1", "plot_figure1", "SOFTMAX_TITLES"]

SOFTMAX_TITLES = {"zscore": "softmax of per-query standardised scores (the paper: of the raw scores)",
                  "raw": "softmax normalised (raw scores, as the paper)"}


def figure1_curves(unlearning: Tensor, others: dict[str, Tensor], softmax_of: str = "zscore"
                   ) -> dict[str, dict[str, np.ndarray]]:
    """Per method (``"unlearning"`` first) and normalisation (``"minmax"``, ``"softmax"``): mean and
    std over queries of the normalised scores, in the unlearning order. Arrays of length N.

    ``softmax_of="zscore"``: softmax((s - mean) / std) per query (see the module docstring);
    ``"raw"``: softmax(s), the paper's normalisation."""
    if softmax_of not in SOFTMAX_TITLES:
        raise ValueError(f"softmax_of {softmax_of!r}: choose one of {sorted(SOFTMAX_TITLES)}")
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
        z = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-30) if softmax_of == "zscore" else s
        for norm, v in (("minmax", minmax_normalize(s, dim=1)), ("softmax", softmax_normalize(z, dim=1))):
            out[name][norm] = np.stack([v.mean(0).numpy(), v.std(0, unbiased=False).numpy()])
    return out


def plot_figure1(unlearning: Tensor, others: dict[str, Tensor], out_png: str,
                 title: str = "Attribution scores sorted by unlearning score", softmax_of: str = "zscore") -> str:
    """Draw Figure 1 from Tensor[Q, N] scores (unlearning and each other method) into ``out_png``."""
    import matplotlib.pyplot as plt

    fig = draw_figure1(unlearning, others, title, softmax_of)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def draw_figure1(unlearning: Tensor, others: dict[str, Tensor],
                 title: str = "Attribution scores sorted by unlearning score", softmax_of: str = "zscore"):
    """The matplotlib Figure of :func:`plot_figure1` (two panels: min-max, softmax)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = figure1_curves(unlearning, others, softmax_of)
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
    axes[1].set_title(SOFTMAX_TITLES[softmax_of], fontsize=9)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("training items (sorted by unlearning score)")
    axes[1].set_ylabel("softmax score")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

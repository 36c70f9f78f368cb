"""Where the draw noise of Eq. 1 lives: per-draw differences d_ij = L_j(z_i, theta_u) - L_j(z_i, theta0) binned
by timestep (a probe for the draw design; prints figures, writes JSON; not a test).

For each of S equal bins of t: the mean and the variance of d_ij within the bin (pooled over items, after
removing each item's mean), and the variance reduction that stratified sampling and Neyman allocation
(draws per stratum proportional to its within-stratum standard deviation) would give at equal cost:

    uniform:     Var(tau) = (1/T) [ mean_s sigma_s^2 + Var_s(mu_s) ]
    stratified:  Var(tau) = (1/T) mean_s sigma_s^2
    Neyman:      Var(tau) = (1/T) (mean_s sigma_s)^2

and what antithetic noise would give: each draw (t_j, eps_j) is also taken with -eps_j, and the correlation rho
of the two halves' d (pooled, each item's mean removed) gives the gain of antithetic pairs at equal cost (a pair is
two forwards): Var(pair mean) / Var(mean of two independent draws) = 1 + rho, gain 1 / (1 + rho).

With ``--shared`` every item takes the same draws (the attribute default's shared_draws); the noise that reorders
items is then e_ij = d_ij - mean_i d_ij (the part all items share moves every score together), and every gain is
also given for e.

    python scripts/draw_variance.py --checkpoint assets/bank/demo/model.ckpt --store runs/demo/store \
        --unlearned runs/demo/unlearned/q000.safetensors --items 64 --draws 64 --bins 8
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from musicattr.attribution.loss import repeat_conditioning
from musicattr.attribution.score import swapped
from musicattr.attribution.unlearn import load_unlearned
from musicattr.data.datamodules import collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.models.sat_task import SATDiffusionTask


def signed_losses(task, model, b, t, eps, sign: float, chunk: int = 16) -> torch.Tensor:
    """[B, D] losses of every item at its draws (t_bj, sign * eps_bj)."""
    z = b["latents"]
    cond = task.conditioning(model, b)
    out = []
    for s in range(0, t.shape[1], chunk):
        tt, ee = t[:, s:s + chunk], eps[:, s:s + chunk]
        n = tt.shape[1]
        loss = task.draw_loss(model, z.repeat_interleave(n, 0), tt.reshape(-1).to(z),
                              sign * ee.reshape(-1, *z.shape[1:]).to(z), repeat_conditioning(cond, n))
        out.append(loss.view(z.shape[0], n).double())
    return torch.cat(out, 1)


def draw_gains(d: np.ndarray, d_minus: np.ndarray | None, t: np.ndarray, bins: int) -> dict:
    """Per-draw variance of ``d`` [N, T] (each item's mean removed) and the equal-cost variance gains of
    stratified t, Neyman allocation and (with ``d_minus``, the same draws with -eps) antithetic pairs."""
    c = d - d.mean(1, keepdims=True)
    b = np.minimum((t * bins).astype(int), bins - 1)
    mu = np.array([c[b == s].mean() for s in range(bins)])
    sig2 = np.array([c[b == s].var() for s in range(bins)])
    # the variance of one uniform draw with every bin at its probability 1/S (not at the count it got: with shared
    # draws only T values of t exist, and their bin counts would weigh the bins by chance)
    total = float(sig2.mean() + mu.var())
    out = {"per_draw_var": total, "bin_mean": mu.tolist(), "bin_var": sig2.tolist(),
           "stratified_gain": total / float(sig2.mean()), "neyman_gain": total / float(np.sqrt(sig2).mean() ** 2)}
    if d_minus is not None:
        cm = d_minus - d_minus.mean(1, keepdims=True)
        rho = float((c * cm).sum() / np.sqrt((c ** 2).sum() * (cm ** 2).sum()))
        out.update(antithetic_rho=rho, antithetic_gain=1.0 / (1.0 + rho))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_root", default="runs/demo", help="the run whose files are the defaults below")
    ap.add_argument("--checkpoint", help="theta0 (default <run_root>/fit/last.ckpt)")
    ap.add_argument("--store", help="the latent store (default <run_root>/store)")
    ap.add_argument("--unlearned", nargs="+", help="default <run_root>/unlearned/q000.safetensors")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timesteps", default="uniform", help="the task's timestep sampler (uniform, stratified-S)")
    ap.add_argument("--shared", action="store_true", help="shared draws: the gains of the item-relative noise too")
    ap.add_argument("--antithetic", action="store_true", help="also the draws with -eps: the antithetic gain")
    ap.add_argument("--out", help="default <run_root>/reproducibility/draw_variance.json")
    a = ap.parse_args()
    a.checkpoint = a.checkpoint or f"{a.run_root}/fit/last.ckpt"
    a.store = a.store or f"{a.run_root}/store"
    a.unlearned = a.unlearned or [f"{a.run_root}/unlearned/q000.safetensors"]
    a.out = a.out or f"{a.run_root}/reproducibility/draw_variance.json"
    torch.set_num_threads(1)
    store = LatentStore(a.store)
    rng = np.random.default_rng(a.seed)
    positions = sorted(rng.choice(len(store), size=min(a.items, len(store)), replace=False).tolist())
    task = SATDiffusionTask(timesteps=a.timesteps, shared_draws=a.shared)
    results = []
    for path in a.unlearned:
        model = task.load(a.checkpoint)
        tensors, meta = load_unlearned(path)
        named = dict(task.net(model).named_parameters())
        params = {k: named[k] for k in tensors}
        unlearned = {k: v.to(named[k].dtype) for k, v in tensors.items()}
        ds, ts, dms = [], [], []
        with torch.no_grad():
            for s in range(0, len(positions), 16):
                b = collate_items([store[p] for p in positions[s:s + 16]])
                t, eps = task.draws(a.seed, task.draw_keys("", b["item_id"]), range(a.draws),
                                    tuple(b["latents"].shape[1:]))
                signs = (1.0, -1.0) if a.antithetic else (1.0,)
                per = {}
                with swapped(params, unlearned):
                    per["u"] = [signed_losses(task, model, b, t, eps, sign) for sign in signs]
                per["0"] = [signed_losses(task, model, b, t, eps, sign) for sign in signs]
                ds.append((per["u"][0] - per["0"][0]).numpy())
                if a.antithetic:
                    dms.append((per["u"][1] - per["0"][1]).numpy())
                ts.append(t.numpy())
        d, t = np.concatenate(ds), np.concatenate(ts)
        variants = {"d": (d, np.concatenate(dms) if dms else None)}
        if a.shared:  # the item-relative noise: what is left after the part every item shares at draw j
            variants["e"] = tuple(None if x is None else x - x.mean(0, keepdims=True) for x in variants["d"])
        gains = {name: draw_gains(x, xm, t, a.bins) for name, (x, xm) in variants.items()}
        g = gains["d"]
        total, mu, sig2 = g["per_draw_var"], np.array(g["bin_mean"]), np.array(g["bin_var"])
        spread = float(d.mean(1).var(ddof=1))
        row = {"query_id": meta["query_id"], "items": len(positions), "draws": a.draws, "per_draw_var": total,
               "timesteps": a.timesteps, "shared": a.shared,
               "bin_mean": g["bin_mean"], "bin_var": g["bin_var"], "stratified_gain": g["stratified_gain"],
               "neyman_gain": g["neyman_gain"], "item_spread_over_draw_var_T32": spread / (total / 32),
               "gains": gains}
        results.append(row)
        print(f"{meta['query_id']}: per-draw variance {total:.3e}; by t bin (mean / variance):")
        for s in range(a.bins):
            print(f"  t in [{s / a.bins:.3f}, {(s + 1) / a.bins:.3f}): mean {mu[s]:+.3e}  variance {sig2[s]:.3e}")
        print(f"  at equal cost: stratified {row['stratified_gain']:.2f}x less variance, Neyman allocation "
              f"{row['neyman_gain']:.2f}x; item-to-item spread of tau / draw variance at T = 32: "
              f"{row['item_spread_over_draw_var_T32']:.1f}")
        for name, g in gains.items():
            print(f"  {'d (per item)' if name == 'd' else 'e (item-relative, shared draws)'}: per-draw variance "
                  f"{g['per_draw_var']:.3e}; gains at equal cost: stratified {g['stratified_gain']:.2f}x, Neyman "
                  f"{g['neyman_gain']:.2f}x" + (f", antithetic {g['antithetic_gain']:.2f}x (rho "
                                                 f"{g['antithetic_rho']:+.2f})" if "antithetic_gain" in g else ""))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()

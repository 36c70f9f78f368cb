"""Where the draw noise of Eq. 1 lives: per-draw differences d_ij = L_j(z_i, theta_u) - L_j(z_i, theta0) binned
by timestep (a probe for the draw design; prints figures, writes JSON; not a test).

For each of S equal bins of t: the mean and the variance of d_ij within the bin (pooled over items, after
removing each item's mean), and the variance reduction that stratified sampling and Neyman allocation
(draws per stratum proportional to its within-stratum standard deviation) would give at equal cost:

    uniform:     Var(tau) = (1/T) [ mean_s sigma_s^2 + Var_s(mu_s) ]
    stratified:  Var(tau) = (1/T) mean_s sigma_s^2
    Neyman:      Var(tau) = (1/T) (mean_s sigma_s)^2

    python scripts/draw_variance.py --checkpoint assets/bank/demo/model.ckpt --store runs/demo/store \
        --unlearned runs/demo/unlearned/q000.safetensors --items 64 --draws 64 --bins 8
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from musicattr.attribution.unlearn import load_unlearned
from musicattr.data.datamodules import collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.models.sat_task import SATDiffusionTask


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
    task = SATDiffusionTask()
    results = []
    for path in a.unlearned:
        model = task.load(a.checkpoint)
        tensors, meta = load_unlearned(path)
        named = dict(task.net(model).named_parameters())
        original = {k: named[k].detach().clone() for k in tensors}
        ds, ts = [], []
        with torch.no_grad():
            for s in range(0, len(positions), 16):
                b = collate_items([store[p] for p in positions[s:s + 16]])
                t, _ = task.draws(a.seed, b["item_id"], range(a.draws), tuple(b["latents"].shape[1:]))
                for k, v in tensors.items():
                    named[k].data = v.to(named[k].dtype)
                lu = task.draw_losses(model, b, a.seed, a.draws)
                for k in tensors:
                    named[k].data = original[k]
                l0 = task.draw_losses(model, b, a.seed, a.draws)
                ds.append((lu - l0).numpy())
                ts.append(t.numpy())
        d, t = np.concatenate(ds), np.concatenate(ts)
        total = float(d.var(1, ddof=1).mean())  # per-draw variance within an item, averaged over items
        bins = np.minimum((t * a.bins).astype(int), a.bins - 1)
        centred = d - d.mean(1, keepdims=True)
        mu = np.array([d[bins == s].mean() for s in range(a.bins)])
        sig2 = np.array([centred[bins == s].var() for s in range(a.bins)])
        strat, neyman = float(sig2.mean()), float(np.sqrt(sig2).mean() ** 2)
        spread = float(d.mean(1).var(ddof=1))
        row = {"query_id": meta["query_id"], "items": len(positions), "draws": a.draws, "per_draw_var": total,
               "bin_mean": mu.tolist(), "bin_var": sig2.tolist(), "stratified_gain": total / strat,
               "neyman_gain": total / neyman, "item_spread_over_draw_var_T32": spread / (total / 32)}
        results.append(row)
        print(f"{meta['query_id']}: per-draw variance {total:.3e}; by t bin (mean / variance):")
        for s in range(a.bins):
            print(f"  t in [{s / a.bins:.3f}, {(s + 1) / a.bins:.3f}): mean {mu[s]:+.3e}  variance {sig2[s]:.3e}")
        print(f"  at equal cost: stratified {row['stratified_gain']:.2f}x less variance, Neyman allocation "
              f"{row['neyman_gain']:.2f}x; item-to-item spread of tau / draw variance at T = 32: "
              f"{row['item_spread_over_draw_var_T32']:.1f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()

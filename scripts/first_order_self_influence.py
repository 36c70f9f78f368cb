"""First-order self-influence check: predicts the train-to-train ranks of `musicattr evaluate` in minutes.

For a small lr, Eq. 1 is tau_i ~= <g_i, theta_unlearned - theta0> = lr/N * g_i^T (F + lambda)^-1 g_q
(the test suite checks this to correlation 0.999999), with
  g_i  the gradient of item i's scoring loss (its T scoring draws, M_L off as in the mixed strategy),
  g_q  the gradient of the target's unlearning loss (K draws keyed 'unlearn/<id>', M_U on).
The rank of the target is computed for Eq. 1 and for the relative score tau_i / s_i with
s_i = ||g_i|| in the (F + lambda)^-1 metric, without unlearning or scoring anything. It keeps all
per-item gradients in memory (N x parameters floats): meant for the demo store, not a catalogue.

    python scripts/first_order_self_influence.py --setup runs/demo/self_influence/setup.json --score_draws 64
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from musicattr.attribution.fisher import load_fisher
from musicattr.attribution.loss import UNLEARN
from musicattr.attribution.task import load_task
from musicattr.attribution.unlearn import damped_inverse, loss_gradient
from musicattr.data.datamodules import collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.evaluation.metrics import target_rank


def flat_gradient(task, params, batch, num_draws: int, seed: int, namespace: str = "", mask: bool = False
                  ) -> torch.Tensor:
    g = loss_gradient(task, params, batch, seed, num_draws, namespace=namespace, mask=mask)
    return torch.cat([g[k].flatten() for k in params]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/fit/last.ckpt")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--fisher", default="runs/demo/fisher.safetensors")
    ap.add_argument("--setup", help="setup.json of an evaluate run (its targets); else --targets")
    ap.add_argument("--targets", nargs="*", default=[], help="training item ids")
    ap.add_argument("--score_draws", type=int, default=16)
    ap.add_argument("--num_draws", type=int, default=128)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--target_group", default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the ranks as JSON here")
    a = ap.parse_args()
    targets = json.load(open(a.setup))["targets"] if a.setup else a.targets
    if not targets:
        ap.error("give --setup or --targets")
    task = load_task(None, a.checkpoint)  # the SAT DiT of `musicattr fit`
    params = task.select_parameters(a.target_group)
    fisher, _ = load_fisher(a.fisher)
    inv = damped_inverse(fisher, params, a.damping)
    inv = torch.cat([inv[k].flatten() for k in params]).float()
    store = LatentStore(a.store)
    ids = [str(i) for i in store.items["item_id"]]
    t0 = time.time()
    grads = torch.empty(len(ids), inv.numel())
    for pos in range(len(ids)):
        grads[pos] = flat_gradient(task, params, collate_items([store[pos]]), a.score_draws, a.seed)
    print(f"per-item gradients: {len(ids)} items x T={a.score_draws} in {time.time() - t0:.0f} s", flush=True)
    norms = (grads.pow(2) * inv).sum(1).double().sqrt()
    rows = []
    for item in targets:
        t = ids.index(item)
        b = collate_items([store[t]])
        gq = flat_gradient(task, params, b, a.num_draws, a.seed, namespace=UNLEARN, mask=True)
        tau = (grads @ (gq * inv)).double()
        rank, rank_rel = target_rank(tau, t), target_rank(tau / norms, t)
        rows.append({"target": item, "rank": rank, "rank_rel": rank_rel})
        print(f"{item}: rank {rank}, relative rank {rank_rel}", flush=True)
    r = np.array([x["rank"] for x in rows])
    rr = np.array([x["rank_rel"] for x in rows])
    summary = {"targets": len(rows), "score_draws": a.score_draws, "num_draws": a.num_draws,
               "R": float(r.mean()), "rank1": int((r == 1).sum()), "R_rel": float(rr.mean()),
               "rank1_rel": int((rr == 1).sum()), "runs": rows}
    print(f"Eq. 1: first for {summary['rank1']}/{len(rows)}, R = {summary['R']:.1f}; "
          f"relative: first for {summary['rank1_rel']}/{len(rows)}, R = {summary['R_rel']:.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

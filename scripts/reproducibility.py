"""Reproducibility of Eq. 1 under its random draws (a benchmark: prints figures, writes JSON; not a test).

For each unlearned query and each draw design (timestep sampler x T), the store is scored twice with two
independent draw seeds, and the two score vectors are compared:

    Spearman over all items, top-10 overlap, credit-share L1 distance (0 = same, 2 = disjoint; the report's
    rule: positive part of tau over the tracks clear of 2 standard errors), the median standard error,
    how many of the top 10 are clear of rank 11 by 2 combined errors, and the seconds per pass.

Cost is counted in forwards: a design at T draws costs T / 32 of the demo's plain T = 32 pass. Everything is
in process (the task's ``draw_losses`` on theta0 and on theta0 with the unlearned tensors, the same draws on
both sides, as ``musicattr attribute`` computes them).

    python scripts/reproducibility.py --checkpoint runs/demo/fit/last.ckpt --store runs/demo/store \
        --unlearned runs/demo/unlearned/q000.safetensors --designs uniform:32 stratified-8:32 uniform:64
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from musicattr.attribution.score import separated
from musicattr.attribution.unlearn import load_unlearned
from musicattr.data.datamodules import collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.models.sat_task import SATDiffusionTask
from musicattr.report.credits import credit_shares

REFERENCE_T = 32  # the demo's plain scoring pass (configs/demo/attribute.yaml)


def score(task, model, params, unlearned, batches, seed: int, draws: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(tau [N], SE [N], seconds) of one pass: d_ij = L_j(theta_u) - L_j(theta0) on the same draws."""
    original = {k: p.detach().clone() for k, p in params.items()}
    t0 = time.perf_counter()
    taus, ses = [], []
    with torch.no_grad():
        for b in batches:
            for k, p in params.items():
                p.data = unlearned[k]
            lu = task.draw_losses(model, b, seed, draws, draws_per_forward=16)
            for k, p in params.items():
                p.data = original[k]
            l0 = task.draw_losses(model, b, seed, draws, draws_per_forward=16)
            d = lu - l0
            taus.append(d.mean(1))
            ses.append(d.std(1, correction=1) / draws ** 0.5)
    return torch.cat(taus).numpy(), torch.cat(ses).numpy(), time.perf_counter() - t0


def adaptive(task, model, params, unlearned, store, tau, se, seed: int, draws: int, k: int, folder: Path,
             budget: float = 1.0, step: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """The pass refined at the top-k boundary (``musicattr.attribution.adaptive``): (tau, SE, extra draws)."""
    import pandas as pd

    from musicattr.attribution.adaptive import DrawSums, refine

    original = {k_: p.detach().clone() for k_, p in params.items()}
    index = store.items["index"].astype(int).to_numpy()
    pos_of = {int(i): p for p, i in enumerate(index)}

    def extra(indices, first, n):
        b = collate_items([store[pos_of[i]] for i in indices])
        with torch.no_grad():
            for k_, p in params.items():
                p.data = unlearned[k_]
            lu = task.draw_losses(model, b, seed, n, draw_offset=first).numpy()
            for k_, p in params.items():
                p.data = original[k_]
            l0 = task.draw_losses(model, b, seed, n, draw_offset=first).numpy()
        return lu, l0

    rows = pd.DataFrame({"index": index, "score": tau, "score_se": se, "unlearned_loss": tau, "baseline_loss": 0.0})
    sums = DrawSums.from_table(rows, draws)
    rounds = refine(sums, extra, folder, k, 2.0, step, budget)
    return sums.tau, sums.se, sum(r["draws_added"] for r in rounds)


def compare(a: tuple, b: tuple, k: int = 10) -> dict:
    """Agreement of two (tau, SE) passes of the same query."""
    import pandas as pd

    (ta, sa), (tb, sb) = a, b
    top = lambda t: set(np.argsort(-t, kind="stable")[:k])  # noqa: E731
    frames = [pd.DataFrame({"score": t, "score_se": s}) for t, s in ((ta, sa), (tb, sb))]
    shares = [credit_shares(f).to_numpy() for f in frames]
    ranked = [f.assign(rank=f["score"].rank(ascending=False, method="first").astype(int)) for f in frames]
    return {"spearman": float(spearmanr(ta, tb).statistic), f"top{k}_overlap": len(top(ta) & top(tb)),
            "share_l1": float(np.abs(shares[0] - shares[1]).sum()), "median_se": float(np.median(sa)),
            "top10_separated": separated(ranked[0], k), "credited": int((shares[0] > 0).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_root", default="runs/demo", help="the run whose files are the defaults below")
    ap.add_argument("--checkpoint", help="theta0 (default <run_root>/fit/last.ckpt)")
    ap.add_argument("--store", help="the latent store (default <run_root>/store)")
    ap.add_argument("--unlearned", nargs="+", help="unlearned files of `musicattr unlearn` (default "
                                                   "<run_root>/unlearned/q000.safetensors)")
    ap.add_argument("--designs", nargs="+", default=["uniform:32", "stratified-8:32", "uniform:64"],
                    help="timesteps[+shared]:T[:aK], timesteps as the task's config (uniform, stratified-S); "
                         "+shared: every item takes the same draws (the task's shared_draws); aK: adaptive draws at "
                         "the top-K boundary after the pass (budget 1 x N T)")
    ap.add_argument("--seeds", nargs=2, type=int, default=[0, 1])
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--out", help="JSON output (default <run_root>/reproducibility/reproducibility.json)")
    a = ap.parse_args()
    a.checkpoint = a.checkpoint or f"{a.run_root}/fit/last.ckpt"
    a.store = a.store or f"{a.run_root}/store"
    a.unlearned = a.unlearned or [f"{a.run_root}/unlearned/q000.safetensors"]
    a.out = a.out or f"{a.run_root}/reproducibility/reproducibility.json"
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))

    store = LatentStore(a.store)
    batches = [collate_items([store[p] for p in range(s, min(len(store), s + a.batch_size))])
               for s in range(0, len(store), a.batch_size)]
    rows = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(store)} items; designs {a.designs}; seeds {a.seeds}; reference: uniform T = {REFERENCE_T}")
    print(f"{'query':<10} {'design':<18} {'cost':>5} {'spearman':>9} {'top10':>6} {'share L1':>9} "
          f"{'median SE':>10} {'clear':>6} {'s/pass':>7}")
    for path in a.unlearned:
        tensors, meta = load_unlearned(path)
        for design in a.designs:
            timesteps, _, rest = design.partition(":")
            draws, _, race = rest.partition(":")  # timesteps:T[:aK] - aK: adaptive draws at the top-K boundary
            draws = int(draws or REFERENCE_T)
            timesteps, shared, _ = timesteps.partition("+shared")
            task = SATDiffusionTask(timesteps=timesteps, shared_draws=bool(shared))
            model = task.load(a.checkpoint)
            named = dict(task.net(model).named_parameters())
            params = {k: named[k] for k in tensors}
            unlearned = {k: v.to(named[k].dtype) for k, v in tensors.items()}
            passes = [score(task, model, params, unlearned, batches, s, draws) for s in a.seeds]
            cost = draws / REFERENCE_T
            if race:
                import shutil
                import tempfile

                refined, added = [], []
                for s, (tau, se, sec) in zip(a.seeds, passes):
                    folder = Path(tempfile.mkdtemp())
                    t0 = time.perf_counter()
                    tau2, se2, n = adaptive(task, model, params, unlearned, store, tau, se, s, draws,
                                            int(race.lstrip("a")), folder)
                    shutil.rmtree(folder)
                    refined.append((tau2, se2, sec + time.perf_counter() - t0))
                    added.append(n)
                passes = refined
                cost += float(np.mean(added)) / (len(store) * REFERENCE_T)
            row = {"query_id": meta["query_id"], "unlearned": path,
                   "design": timesteps + shared + (f"+{race}" if race else ""),
                   "num_draws": draws, "cost": cost, "seconds_per_pass": float(np.mean([p[2] for p in passes])),
                   **compare(passes[0][:2], passes[1][:2])}
            rows.append(row)
            print(f"{row['query_id']:<10} {row['design'] + ' T=' + str(draws):<18} {row['cost']:>4.1f}x "
                  f"{row['spearman']:>9.3f} {row['top10_overlap']:>4}/10 {row['share_l1']:>9.2f} "
                  f"{row['median_se']:>10.2e} {row['top10_separated']:>4}/10 {row['seconds_per_pass']:>7.1f}",
                  flush=True)
            out.write_text(json.dumps(rows, indent=1))
    print("\nmean over queries:")
    for design in a.designs:
        name, _, rest = design.partition(":")
        t, _, race = rest.partition(":")
        sel = [r for r in rows if r["design"] == name + (f"+{race}" if race else "") and
               r["num_draws"] == int(t or REFERENCE_T)]
        if sel:
            print(f"  {design:<18} spearman {np.mean([r['spearman'] for r in sel]):.3f}  top-10 "
                  f"{np.mean([r['top10_overlap'] for r in sel]):.1f}/10  share L1 "
                  f"{np.mean([r['share_l1'] for r in sel]):.2f}  ({len(sel)} queries)")
    print(f"written: {out}")


if __name__ == "__main__":
    main()

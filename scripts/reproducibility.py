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

from musicattr.attribution.score import separated, swapped
from musicattr.attribution.unlearn import load_unlearned
from musicattr.data.datamodules import collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.fingerprint import file_fingerprint
from musicattr.models.sat_task import SATDiffusionTask
from musicattr.report.credits import credit_shares

REFERENCE_T = 32  # the demo's plain scoring pass (configs/demo/attribute.yaml)


def score(task, model, params, unlearned, batches, seed: int, draws: int,
          baseline: list | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(tau [N], SE [N], seconds) of one pass: d_ij = L_j(theta_u) - L_j(theta0) on the same draws.

    ``baseline``: the per-draw losses L_j(z_i, theta0) of this (design, seed, T), one tensor per batch; they do
    not depend on the query (as `attribute`'s baseline cache), so they are computed once (into an empty list)
    and reused by every later query. Seconds count the theta_u side only once the baseline is cached."""
    t0 = time.perf_counter()
    taus, ses = [], []
    fill = baseline is not None and not baseline
    with torch.no_grad():
        for n, b in enumerate(batches):
            with swapped(params, unlearned):
                lu = task.draw_losses(model, b, seed, draws, draws_per_forward=16)
            if baseline is None or fill:
                l0 = task.draw_losses(model, b, seed, draws, draws_per_forward=16)
                if fill:
                    baseline.append(l0)
            else:
                l0 = baseline[n]
            d = lu - l0
            taus.append(d.mean(1))
            ses.append(d.std(1, correction=1) / draws ** 0.5)
    return torch.cat(taus).numpy(), torch.cat(ses).numpy(), time.perf_counter() - t0


def adaptive(task, model, params, unlearned, store, tau, se, seed: int, draws: int, k: int, folder: Path,
             budget: float = 1.0, step: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """The pass refined at the top-k boundary (``musicattr.attribution.adaptive``): (tau, SE, extra draws)."""
    import pandas as pd

    from musicattr.attribution.adaptive import DrawSums, refine

    index = store.items["index"].astype(int).to_numpy()
    pos_of = {int(i): p for p, i in enumerate(index)}

    def extra(indices, first, n):
        b = collate_items([store[pos_of[i]] for i in indices])
        with torch.no_grad():
            with swapped(params, unlearned):
                lu = task.draw_losses(model, b, seed, n, draw_offset=first).numpy()
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
    ap.add_argument("--designs", nargs="+", default=["uniform:32", "stratified-8+shared:64", "uniform:64"],
                    help="timesteps[+shared]:T[:aK], timesteps as the task's config (uniform, stratified-S); "
                         "+shared: every item takes the same draws (the task's shared_draws); aK: adaptive draws at "
                         "the top-K boundary after the pass (budget 1 x N T)")
    ap.add_argument("--seeds", nargs=2, type=int, default=[0, 1])
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--indexes", nargs=2, metavar=("INDEX_A", "INDEX_B"),
                    help="two indexes of `musicattr index` built with two scoring-draw seeds: each query is also "
                         "scored by both (its psi from the unlearned file) and the two compared as a design 'index'")
    ap.add_argument("--fisher", help="the Fisher of the indexes (default <run_root>/fisher.safetensors)")
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
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []  # resume: rows already measured are kept
    setting = {"checkpoint": a.checkpoint, "store": a.store, "seeds": list(a.seeds)}
    rows = [r for r in rows if all(r.get(k) == v for k, v in setting.items())]  # another model's rows: dropped
    prints = {p: file_fingerprint(p) for p in a.unlearned}
    rows = [r for r in rows if prints.get(r["unlearned"]) == r.get("unlearned_fingerprint")]  # the same file only
    done = {(r["unlearned"], r["design"], r["num_draws"]) for r in rows}
    models, baselines = {}, {}
    print(f"{len(store)} items; designs {a.designs}; seeds {a.seeds}; reference: uniform T = {REFERENCE_T}"
          + (f"; {len(rows)} rows resumed from {out}" if rows else ""))
    print(f"{'query':<10} {'design':<28} {'cost':>5} {'spearman':>9} {'top10':>6} {'share L1':>9} "
          f"{'median SE':>10} {'clear':>6} {'s/pass':>7}")
    for path in a.unlearned:
        tensors, meta = load_unlearned(path)
        for design in a.designs:
            timesteps, draws, race, shared = parse_design(design)
            name = timesteps + shared + (f"+{race}" if race else "")
            if (path, name, draws) in done:
                continue
            if (timesteps, shared) not in models:
                task = SATDiffusionTask(timesteps=timesteps, shared_draws=bool(shared))
                models[timesteps, shared] = (task, task.load(a.checkpoint))
            task, model = models[timesteps, shared]
            named = dict(task.net(model).named_parameters())
            params = {k: named[k] for k in tensors}
            unlearned = {k: v.to(named[k].dtype) for k, v in tensors.items()}
            passes = []
            for s in a.seeds:
                key = (timesteps, shared, s, draws)
                if key not in baselines:  # theta0's per-draw losses of this design: on disk, beside the JSON
                    baselines[key] = [], out.parent / "baselines" / (
                        f"{file_fingerprint(a.checkpoint)}-{store.fingerprint}-{timesteps}{shared}-s{s}-T{draws}.pt")
                    if baselines[key][1].exists():
                        baselines[key][0].extend(torch.load(baselines[key][1]))
                cached, file = baselines[key]
                fresh = not cached
                passes.append(score(task, model, params, unlearned, batches, s, draws, cached))
                if fresh:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(cached, file)
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
            row = {"query_id": meta["query_id"], "unlearned": path, "unlearned_fingerprint": prints[path],
                   "design": name, **setting,
                   "num_draws": draws, "cost": cost, "seconds_per_pass": float(np.mean([p[2] for p in passes])),
                   **compare(passes[0][:2], passes[1][:2])}
            rows.append(row)
            print(f"{row['query_id']:<10} {row['design'] + ' T=' + str(draws):<28} {row['cost']:>4.1f}x "
                  f"{row['spearman']:>9.3f} {row['top10_overlap']:>4}/10 {row['share_l1']:>9.2f} "
                  f"{row['median_se']:>10.2e} {row['top10_separated']:>4}/10 {row['seconds_per_pass']:>7.1f}",
                  flush=True)
            out.write_text(json.dumps(rows, indent=1))
    if a.indexes:
        rows += index_rows(a, rows, setting, out)
    summary = summarize(rows, a.designs + (["index:0"] if a.indexes else []), list(a.unlearned))
    out.with_name(out.stem + "_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"written: {out} and {out.with_name(out.stem + '_summary.json')}")


def index_rows(a, rows: list[dict], setting: dict, out: Path) -> list[dict]:
    """The index's reproducibility: each query scored by two indexes whose per-item gradients average other
    draws (built with two scoring seeds), compared like two exact passes (no SE: every positive score is
    credited). Cost: a lookup, after one build per index."""
    import pandas as pd

    from musicattr.attribution.query import open_query

    done = {r["unlearned"] for r in rows if r["design"] == "index" and r.get("indexes") == list(a.indexes)}
    todo = [p for p in a.unlearned if p not in done]
    if not todo:
        return []
    fisher = a.fisher or f"{a.run_root}/fisher.safetensors"
    ctxs = [open_query(i, a.checkpoint, fisher, store=a.store) for i in a.indexes]
    order = [c.index.items["index"].astype(int).to_numpy() for c in ctxs]
    new = []
    for path in todo:
        taus = []
        for c, o in zip(ctxs, order):
            t0 = time.perf_counter()
            psi, info = c.from_unlearned(path)
            tau = pd.Series(c.scores([psi])[:, 0], index=o).sort_index().to_numpy()
            taus.append((tau, np.zeros_like(tau), time.perf_counter() - t0))
        row = {"query_id": info["query_id"], "unlearned": path, "unlearned_fingerprint": file_fingerprint(path),
               "design": "index", "num_draws": 0, **setting,
               "indexes": list(a.indexes), "cost": 0.0,
               "seconds_per_pass": float(np.mean([t[2] for t in taus])), **compare(taus[0][:2], taus[1][:2])}
        new.append(row)
        print(f"{row['query_id']:<10} {'index (two builds)':<28} {'-':>5} {row['spearman']:>9.3f} "
              f"{row['top10_overlap']:>4}/10 {row['share_l1']:>9.2f} {'':>10} {'':>6} {row['seconds_per_pass']:>7.1f}",
              flush=True)
        out.write_text(json.dumps(rows + new, indent=1))
    return new


def parse_design(design: str) -> tuple[str, int, str, str]:
    """'timesteps[+shared]:T[:aK]' -> (timesteps, T, 'aK' or '', '+shared' or '')."""
    timesteps, _, rest = design.partition(":")
    draws, _, race = rest.partition(":")
    timesteps, shared, _ = timesteps.partition("+shared")
    return timesteps, int(draws or REFERENCE_T), race, shared


METRICS = ("spearman", "top10_overlap", "share_l1")


def interval(values: np.ndarray, seed: int = 0, resamples: int = 10000) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of ``values``: a seeded bootstrap over the queries (the rows)."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return float(values.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return float(values.mean()), *map(float, np.quantile(means, [0.025, 0.975]))


def summarize(rows: list[dict], designs: list[str], paths: list[str]) -> dict:
    """Per design: the mean of each metric over the queries with a 95% bootstrap interval; and each design's
    paired difference against the first (the same queries, the queries resampled together)."""
    table = {}
    for design in designs:
        timesteps, draws, race, shared = parse_design(design)
        name = timesteps + shared + (f"+{race}" if race else "")
        by_path = {r["unlearned"]: r for r in rows if r["design"] == name and r["num_draws"] == draws}
        table[design] = {p: by_path[p] for p in paths if p in by_path}
    reference = designs[0]
    print("\nmean over queries (95% bootstrap interval over queries); paired difference against " + reference)
    summary = {"reference": reference, "designs": {}}
    for design, got in table.items():
        if not got:
            continue
        entry = {"queries": len(got), "cost": float(np.mean([r["cost"] for r in got.values()]))}
        line = f"  {design:<26} {entry['cost']:.1f}x  {len(got)} queries"
        for m in METRICS:
            mean, lo, hi = interval([r[m] for r in got.values()])
            entry[m] = {"mean": mean, "lo": lo, "hi": hi}
            line += f"  {m} {mean:.3f} [{lo:.3f}, {hi:.3f}]"
        common = [p for p in got if p in table[reference]]
        if design != reference and common:
            for m in METRICS:
                mean, lo, hi = interval([got[p][m] - table[reference][p][m] for p in common])
                entry[f"{m}_minus_reference"] = {"mean": mean, "lo": lo, "hi": hi, "queries": len(common)}
            line += "\n" + " " * 30 + "minus reference: " + "  ".join(
                f"{m} {entry[m + '_minus_reference']['mean']:+.3f} [{entry[m + '_minus_reference']['lo']:+.3f}, "
                f"{entry[m + '_minus_reference']['hi']:+.3f}]" for m in METRICS) + f"  ({len(common)} paired)"
        summary["designs"][design] = entry
        print(line)
    return summary


if __name__ == "__main__":
    main()

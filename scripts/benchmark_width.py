"""How the paired LDS interval of two methods narrows with queries and with subsets, from the bank itself.

For each (M subsets, Q queries) it draws ``--reps`` random sub-banks (M of the finished seed-0 subsets, Q of the
non-training queries) and bootstraps the difference LDS_a - LDS_b with the benchmark's own bootstrap
(``bank_stats.lds_bootstrap``): queries and subsets together, queries alone, subsets alone (``--draws`` each). The half-widths' means say which count a narrower interval needs (README, "How
the bank got its power"). Reads the scores of a finished `make benchmark-scores` compare run, like `musicattr benchmark`.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_width.py \
        --a unlearning --b 'all-against-all[aisfx]' --json docs/evidence/benchmark_width.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import musicattr.peers.methods  # noqa: F401  (registers the peers' methods)
from musicattr.counterfactual import bank_stats as st
from musicattr.counterfactual.bank import Bank
from musicattr.counterfactual.benchmark import bank_losses
from musicattr.counterfactual.methods import method_scores, parse_methods


def half_widths(ga, gb, loss, qs, js, draws, seed) -> tuple[float, float, float]:
    """(joint, queries alone, subsets alone) half-widths of LDS_a - LDS_b on the sub-bank (qs, js), by
    ``bank_stats.lds_bootstrap``, the benchmark's own bootstrap."""
    out = st.lds_bootstrap({"a": ga[qs][:, js], "b": gb[qs][:, js]}, loss[qs][:, js], draws, seed, decompose=draws)
    _, lo, hi, _ = out["pairs"]["a", "b"]
    return ((hi - lo) / 2, *out["widths"]["a", "b"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", default="assets/bank/demo")
    p.add_argument("--compare", default="runs/demo/benchmark/compare")
    p.add_argument("--a", default="unlearning")
    p.add_argument("--b", default="all-against-all[aisfx]")
    p.add_argument("--subsets", default="16,24,32,48", help="M values (of the finished seed-0 subsets, first ones)")
    p.add_argument("--queries", default="22,44", help="Q values")
    p.add_argument("--first", type=int, default=48, help="draw from the design's first N subsets only (as the "
                   "README's table, `benchmark --subsets 48`; 0: every finished one), so a growing bank gives the same")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    bank = Bank(a.bank)
    table = bank.queries_table()
    qids = list(table["query_id"])
    head = np.array(table["kind"]) != "training"
    scores = method_scores(parse_methods([a.a, a.b]), Path(a.compare), qids, bank.item_ids, a.seed,
                           random_per_query=True, fix="run `make benchmark-scores` first")
    la = bank_losses(bank, qids)["lds"][int(bank.manifest["settings"]["lds"]["seed"])]
    done = np.flatnonzero(~np.isnan(la[0]))
    if a.first:
        done = done[done < a.first]
    kept = bank.kept()[done]
    loss = la[head][:, done]
    ga, gb = (st.subset_sums(scores[m], kept)[head] for m in (a.a, a.b))
    rng = np.random.default_rng(a.seed)
    rows = []
    for m in [int(x) for x in a.subsets.split(",")]:
        for q in [int(x) for x in a.queries.split(",")]:
            if m > len(done) or q > loss.shape[0]:
                continue
            w = [half_widths(ga, gb, loss, np.sort(rng.choice(loss.shape[0], q, replace=False)),
                             np.sort(rng.choice(len(done), m, replace=False)), a.draws, a.seed + r)
                 for r in range(a.reps)]
            wb, wq, wj = np.mean(w, 0)
            rows.append({"subsets": m, "queries": q, "joint": float(wb), "queries_alone": float(wq),
                         "subsets_alone": float(wj)})
            print(f"M = {m:3d} subsets, Q = {q:3d} queries: half-width of {a.a} - {a.b} {wb:.3f}; with the queries "
                  f"alone resampled {wq:.3f}, the subsets alone {wj:.3f} (mean of {a.reps} sub-banks)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"a": a.a, "b": a.b, "finished_subsets": int(len(done)), "first": a.first,
                                            "non_training_queries": int(loss.shape[0]), "reps": a.reps,
                                            "draws": a.draws, "seed": a.seed, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

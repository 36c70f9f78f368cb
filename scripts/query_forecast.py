"""How many queries the paired LDS interval of two methods needs, from the bank itself (README, "Where that
width comes from").

The query part of the interval is the spread over queries of the per-query difference
d_q = LDS_a(q) - LDS_b(q), which has two sources: how much the methods' gap truly differs between queries
(``between``, fixed however many subsets are retrained) and the noise of each Spearman over M subsets
(``within`` ~ k / M). Splitting the finished subsets into random halves separates them: the covariance of
d_q between two disjoint halves estimates ``between``, and the rest of the variance at M/2 gives k. The
forecast half-width of the query part at Q queries and M subsets is 1.96 sqrt((between + k / M) / Q); the
subset part is the benchmark's own (``half_width_subsets_alone``) scaled by sqrt(M_now / M); their root sum of
squares is printed beside it (the joint interval ran 9% to 16% above that root on the sub-banks of
``scripts/benchmark_width.py``).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/query_forecast.py --subsets 108
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from musicattr.counterfactual import bank_stats as st
from musicattr.counterfactual.bank import Bank
from musicattr.counterfactual.benchmark import bank_losses
from musicattr.counterfactual.shipped_scores import read_shipped, shipped_queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", default="assets/bank/demo")
    p.add_argument("--scores", default="assets/bank/demo/scores")
    p.add_argument("--a", default="unlearning")
    p.add_argument("--b", default="all-against-all[aisfx]")
    p.add_argument("--subsets", type=int, default=None, help="the first N LDS subsets (default: every finished)")
    p.add_argument("--splits", type=int, default=200, help="random half splits of the subsets")
    p.add_argument("--draws", type=int, default=500, help="bootstrap draws of the subset part")
    p.add_argument("--queries", default="44,64,104,144,204")
    p.add_argument("--targets", default="200,320,400")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    bank = Bank(a.bank)
    table = bank.queries_table()
    table = table[(table["kind"] != "training") & table["query_id"].isin(shipped_queries(a.scores))]
    qids = list(table["query_id"])
    sc = read_shipped(bank, a.scores, [a.a, a.b], qids)
    keep = np.isfinite(sc[a.a]).all(1) & np.isfinite(sc[a.b]).all(1)
    loss = bank_losses(bank, qids)["lds"][0]
    m = a.subsets or loss.shape[1]
    loss = loss[:, :m]
    done = ~np.isnan(loss).any(0)                     # subsets every scored query has
    keep &= ~np.isnan(loss[:, done]).any(1)
    loss, kept = loss[keep][:, done], bank.kept()[:m][done]
    ga, gb = st.subset_sums(sc[a.a][keep], kept), st.subset_sums(sc[a.b][keep], kept)
    q, mm = loss.shape

    def diff(cols):
        return st.row_spearman(ga[:, cols], -loss[:, cols]) - st.row_spearman(gb[:, cols], -loss[:, cols])

    rng = np.random.default_rng(0)
    cov, var = [], []
    for _ in range(a.splits):
        perm = rng.permutation(mm)
        x, y = diff(perm[:mm // 2]), diff(perm[mm // 2:2 * (mm // 2)])
        cov.append(np.cov(x, y)[0, 1])
        var.append((x.var(ddof=1) + y.var(ddof=1)) / 2)
    between = float(np.mean(cov))
    k = float(np.mean(var) - between) * (mm // 2)
    boot = st.lds_bootstrap({"a": ga, "b": gb}, loss, a.draws, 0, decompose=a.draws)
    wq, wj = boot["widths"]["a", "b"]
    d, lo, hi, _ = boot["pairs"]["a", "b"]
    print(f"{a.a} - {a.b} on {q} queries and {mm} subsets: {d:+.3f} [{lo:+.3f}, {hi:+.3f}], half-width "
          f"{(hi - lo) / 2:.3f} ({wq:.3f} from the queries, {wj:.3f} from the subsets)")
    print(f"per-query difference: between-query variance {between:.4f}, within-query noise {k:.3f} / M "
          f"({k / mm:.4f} at M = {mm}); {a.splits} random half splits")
    rows = []
    print("| M subsets | Q queries | query part | subset part | root sum of squares |")
    print("|---|---|---|---|---|")
    for mt in [mm, *map(int, a.targets.split(","))]:
        for qt in [q, *[int(x) for x in a.queries.split(",") if int(x) != q]]:
            qp = 1.96 * np.sqrt((between + k / mt) / qt)
            sp = wj * np.sqrt(mm / mt)
            rows.append({"subsets": mt, "queries": qt, "query_part": qp, "subset_part": sp, "rss": float(np.hypot(qp, sp))})
            print(f"| {mt} | {qt} | {qp:.3f} | {sp:.3f} | {np.hypot(qp, sp):.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"a": a.a, "b": a.b, "queries": q, "subsets": mm, "diff": d, "ci": [lo, hi],
                       "half_width_queries_alone": wq, "half_width_subsets_alone": wj, "between": between,
                       "within_k": k, "forecast": rows}, f, indent=1)


if __name__ == "__main__":
    main()

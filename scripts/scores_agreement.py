"""How far a rescoring agrees with the shipped scores of a method: per query, the Spearman correlation over the
training tracks and the overlap of the top 10, and the largest difference relative to the query's largest score.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/scores_agreement.py --method ekfac --tables /tmp/ek32 --prefix q0
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from musicattr.counterfactual.bank import Bank
from musicattr.counterfactual.shipped_scores import read_shipped
from musicattr.evaluation.fidelity import topk_overlap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", default="assets/bank/demo")
    p.add_argument("--scores", default="assets/bank/demo/scores")
    p.add_argument("--method", required=True, help="the shipped method, e.g. ekfac")
    p.add_argument("--tables", required=True, help="a folder with queries/<id>/<method>/scores.parquet")
    p.add_argument("--prefix", default="q", help="only the query ids starting so (q: the non-training queries)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    bank = Bank(a.bank)
    qids = [q for q in bank.queries_table()["query_id"] if q.startswith(a.prefix)
            and (Path(a.tables) / "queries" / q / a.method / "scores.parquet").exists()]
    shipped = read_shipped(bank, a.scores, [a.method], qids)[a.method]
    rho, top, rel = [], [], []
    for j, q in enumerate(qids):
        t = pd.read_parquet(f"{a.tables}/queries/{q}/{a.method}/scores.parquet").set_index("item_id")
        other = t["score"].reindex(bank.item_ids).to_numpy(np.float64)
        s = shipped[j]
        rho.append(spearmanr(s, other)[0])
        top.append(topk_overlap(s, other, 10))
        rel.append(np.abs(s - other).max() / np.abs(s).max())
    out = {"queries": len(qids), "spearman": [min(rho), float(np.mean(rho)), max(rho)],
           "top10_overlap": [min(top), float(np.mean(top))], "max_rel_diff": max(rel)}
    print(f"{a.method}, {len(qids)} queries: Spearman min {min(rho):.4f} mean {np.mean(rho):.4f} max {max(rho):.4f}; "
          f"top-10 overlap min {min(top)} mean {np.mean(top):.1f}; largest difference {max(rel):.2g} of the largest score")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

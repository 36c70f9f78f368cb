"""Diagnostics of the index ensemble of `musicattr ensemble` (docs/evidence/ensemble_benchmark.md), no model run:

- member-0's tables (psi from the gradient of Eq. 2) against compare's own index tables (psi from the unlearned file):
  Spearman per query (the same direction, so it should be 1 up to float rounding);
- each member's score scale (median over queries of the sd over items), by query kind: how much each member weighs in
  the raw mean;
- the members' agreement: median Spearman over the non-training queries between two members' scores;
- variants for the benchmark, written under <work_dir>/variants/queries/<id>/<name>/scores.parquet (analysis only, not
  a registered method): the raw mean of members 0+1 (``seeds01``), of members 1+2 (``seeds12``, without the model that
  generated the queries), and the mean of the members' scores z-scored per query (``z``).

    .venv/bin/python scripts/ensemble_analysis.py --work_dir runs/demo/benchmark/ensemble \
        --compare runs/demo/benchmark/compare --store runs/demo/store
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from musicattr.attribution.ensemble import ensemble_table, read_member_scores, write_ensemble_table
from musicattr.data.latent_store import LatentStore

MEMBERS = ("member-0", "member-1", "member-2")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work_dir", default="runs/demo/benchmark/ensemble")
    ap.add_argument("--compare", default="runs/demo/benchmark/compare")
    ap.add_argument("--store", default="runs/demo/store")
    a = ap.parse_args(argv)
    work, compare = Path(a.work_dir), Path(a.compare)
    items = LatentStore(a.store).items
    ids = list(items["item_id"].astype(str))
    queries = pd.read_csv(compare / "queries.csv", dtype={"query_id": str})

    def member(m: str, qid: str) -> np.ndarray:
        return read_member_scores([work / m / "queries" / qid / "scores.parquet"], ids)[0]

    out: dict = {}
    rho = [spearmanr(member("member-0", q), read_member_scores([compare / "queries" / q / "index" / "scores.parquet"],
                                                               ids)[0])[0] for q in queries["query_id"]]
    out["member0_vs_compare_index_spearman"] = {"min": float(np.min(rho)), "median": float(np.median(rho))}
    out["score_scale_by_kind"] = {kind: {m: float(np.median([member(m, q).std() for q in sub["query_id"]]))
                                         for m in MEMBERS} | {"queries": len(sub)}
                                  for kind, sub in queries.groupby("kind")}
    headline = queries.loc[queries["kind"] != "training", "query_id"]
    agree = {}
    for i, x in enumerate(MEMBERS):
        for y in MEMBERS[i + 1:]:
            agree[f"{x} ~ {y}"] = float(np.median([spearmanr(member(x, q), member(y, q))[0] for q in headline]))
    out["member_agreement_median_spearman"] = agree
    variants = work / "variants" / "queries"
    for q in queries["query_id"]:
        for name, ms in (("seeds01", MEMBERS[:2]), ("seeds12", MEMBERS[1:])):
            write_ensemble_table(variants / q / name / "scores.parquet", items,
                                 [work / m / "queries" / q / "scores.parquet" for m in ms], q, list(ms),
                                 method=f"index-ensemble-{name}")
        s = read_member_scores([work / m / "queries" / q / "scores.parquet" for m in MEMBERS], ids)
        z = (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)
        (variants / q / "z").mkdir(parents=True, exist_ok=True)
        ensemble_table(items, z, q, list(MEMBERS), method="index-ensemble-z").to_parquet(
            variants / q / "z" / "scores.parquet", index=False)
    out["variants"] = str(variants)
    (work / "analysis.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

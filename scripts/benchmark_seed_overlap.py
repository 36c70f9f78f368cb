"""How far each attribution method's ranking moves when only its random draw seed changes (issue 19, part 4: "top-10
overlap between two draw seeds"), on the bank's benchmark model.

For every method and query: the seed-0 scores table (the benchmark's compare run, where ``musicattr benchmark`` reads
it) and the seed-1 table of the same query (``runs/demo/benchmark-seed1``, written with the same settings and draw
seed 1; docs/evidence/benchmark_seed_overlap.md has the commands), matched by item id. Per query: Spearman over the
training items and the top-10 overlap (how many of the 10 highest scores under seed 0 are among the 10 highest
under seed 1). Per method: the mean over the queries with a seeded 95% bootstrap interval over the queries.

The queries: by default the first ``--num_queries`` generated queries of the held-back report half in the order of
``split.csv`` (the rule was fixed before any seed-1 table was computed).

    .venv/bin/python scripts/benchmark_seed_overlap.py --out docs/evidence/benchmark_seed_overlap.json \
        --times runs/demo/benchmark-seed1/logs/times.tsv
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from musicattr.evaluation.fidelity import topk_overlap

ROOT = Path(__file__).resolve().parents[1]

# name, seed-0 table, seed-1 table (both relative to their roots, ``{q}`` the query id), score column, what the
# seed-1 rerun redrew, and the names of its commands in the runner's times.tsv (regular expressions matched to the
# whole name: the seconds of the rerun).
METHODS = [
    {"method": "unlearning", "seed0": "queries/{q}/unlearning/scores.parquet",
     "seed1": "queries/{q}/unlearning/scores.parquet", "column": "score",
     "redrawn": "Eq. 2's query draws (K = 128) and Eq. 1's scoring draws (T = 32)",
     "cost": [r"unlearn-q\d+", r"attribute-q\d+"]},
    {"method": "unlearning-relative", "seed0": "queries/{q}/unlearning/scores.parquet",
     "seed1": "queries/{q}/unlearning/scores.parquet", "column": "relative_score",
     "redrawn": "as unlearning (and s_i over the seed-1 scoring draws)",
     "cost": [r"unlearn-q\d+", r"attribute-q\d+"]},
    {"method": "unlearning (scoring draws only)", "seed0": "queries/{q}/unlearning/scores.parquet",
     "seed1": "queries/{q}/unlearning-scoring-seed1/scores.parquet", "column": "score",
     "redrawn": "Eq. 1's scoring draws only (the seed-0 unlearned file)", "cost": [r"attribute-scoring-only-q\d+"]},
    {"method": "unlearning-relative (scoring draws only)", "seed0": "queries/{q}/unlearning/scores.parquet",
     "seed1": "queries/{q}/unlearning-scoring-seed1/scores.parquet", "column": "relative_score",
     "redrawn": "Eq. 1's scoring draws only (the seed-0 unlearned file)", "cost": [r"attribute-scoring-only-q\d+"]},
    {"method": "index", "seed0": "queries/{q}/index/scores.parquet", "seed1": "index_queries/{q}/scores.parquet",
     "column": "score", "redrawn": "the index's scoring draws (a second build, --model.seed 1) and the query's "
     "Eq. 2 draws (psi from the seed-1 unlearned file); projection seed 0", "cost": ["index-build", "index-query"]},
    {"method": "index-relative", "seed0": "queries/{q}/index/scores.parquet",
     "seed1": "index_queries/{q}/scores.parquet", "column": "relative_score", "redrawn": "as index",
     "cost": ["index-build", "index-query"]},
    {"method": "index (build draws only)", "seed0": "queries/{q}/index/scores.parquet",
     "seed1": "index_queries_build_only/{q}/scores.parquet", "column": "score",
     "redrawn": "the index's scoring draws only (psi from the seed-0 unlearned file)",
     "cost": ["index-build", "index-query-build-only"]},
    {"method": "ekfac", "seed0": "queries/{q}/ekfac/scores.parquet", "seed1": "queries/{q}/ekfac/scores.parquet",
     "column": "score", "redrawn": "g_i's draws (T = 32) and g_q's draws (K = 32); EK-FAC factors reused (fit seed 0)",
     "cost": ["peers-ekfac"]},
    {"method": "trak", "seed0": "queries/{q}/trak/scores.parquet", "seed1": "queries/{q}/trak/scores.parquet",
     "column": "score", "redrawn": "the training features' draws (T = 32) and the queries' (K = 32); proj_seed 0",
     "cost": ["peers-trak"]},
    {"method": "dtrak", "seed0": "queries/{q}/dtrak/scores.parquet", "seed1": "queries/{q}/dtrak/scores.parquet",
     "column": "score", "redrawn": "the training features' draws (T = 32) and the queries' (K = 32); proj_seed 0",
     "cost": ["peers-dtrak"]},
    {"method": "unlearning-ekfac", "seed0": "queries/{q}/unlearning-ekfac/scores.parquet",
     "seed1": "queries/{q}/unlearning-ekfac/scores.parquet", "column": "score",
     "redrawn": "Eq. 2's query draws (K = 128), Eq. 1's scoring draws and baseline losses (T = 32); EK-FAC factors "
     "reused (fit seed 0)", "cost": ["peers-unlearning-ekfac"]},
    {"method": "index-ensemble", "seed0": "queries/{q}/index-ensemble/scores.parquet",
     "seed1": "queries/{q}/index-ensemble/scores.parquet", "column": "score",
     "redrawn": "every member's index scoring draws (seed-1 builds of the three members' indexes) and the query's "
     "Eq. 2 draws on each member (`musicattr ensemble` with seed 1); members and projection seed 0 as before",
     "cost": ["ensemble-seed1"]},
]


def rule_queries(split: pd.DataFrame, n: int, kind: str = "generated", half: str = "report") -> list[str]:
    """The first ``n`` queries of ``kind`` in ``half``, in the split's row order."""
    rows = split[(split["kind"] == kind) & (split["half"] == half)]
    return [str(q) for q in rows["query_id"].head(n)]


def paired(a: pd.DataFrame, b: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The two tables' ``column`` over the same training items (matched by item_id, in a's order); refuses tables
    that do not hold the same items."""
    x = a.set_index("item_id")[column]
    y = b.set_index("item_id")[column]
    if x.index.has_duplicates or y.index.has_duplicates:
        raise ValueError("a scores table names an item twice")
    if set(x.index) != set(y.index):
        raise ValueError(f"the tables hold different items ({len(set(x.index) ^ set(y.index))} differ)")
    return x.to_numpy(np.float64), y.reindex(x.index).to_numpy(np.float64)


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict[str, float]:
    """Spearman over the items and the top-k overlap of two score vectors of one query."""
    return {"spearman": float(spearmanr(a, b).statistic), f"top{k}_overlap": topk_overlap(a, b, k)}


def interval(values, seed: int = 0, resamples: int = 10000) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of ``values``: a seeded bootstrap over the queries (the entries)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return float(values.mean()), *map(float, np.quantile(means, [0.025, 0.975]))


def read_times(path: Path | None) -> pd.DataFrame:
    """The runner's times.tsv: name, seconds, exit status, finish time (one row per command)."""
    if path is None or not path.exists():
        return pd.DataFrame(columns=["name", "seconds", "rc", "finished"])
    return pd.read_csv(path, sep="\t", names=["name", "seconds", "rc", "finished"])


def rerun_seconds(times: pd.DataFrame, patterns: list[str]) -> float | None:
    """Wall-clock seconds of the successful commands whose whole name matches one of the regular expressions
    ``patterns`` (the last run of each name), or None when none ran."""
    ok = times[(times["rc"] == 0) & times["name"].map(lambda n: any(re.fullmatch(p, str(n)) for p in patterns))]
    ok = ok.drop_duplicates("name", keep="last")
    return float(ok["seconds"].sum()) if len(ok) else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed0", default="runs/demo/benchmark/compare", help="root of the seed-0 tables")
    ap.add_argument("--seed1", default="runs/demo/benchmark-seed1", help="root of the seed-1 tables")
    ap.add_argument("--split", default="assets/bank/demo/queries/split.csv")
    ap.add_argument("--num_queries", type=int, default=8, help="queries by the rule (first n generated, report half)")
    ap.add_argument("--queries", nargs="*", default=None, help="query ids instead of the rule")
    ap.add_argument("--methods", nargs="*", default=None, help="a subset of the methods (default: all)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--bootstrap_seed", type=int, default=0)
    ap.add_argument("--times", default=None, help="the runner's times.tsv: seconds of each seed-1 rerun")
    ap.add_argument("--out", default="docs/evidence/benchmark_seed_overlap.json")
    a = ap.parse_args(argv)

    queries = a.queries or rule_queries(pd.read_csv(a.split, dtype={"query_id": str}), a.num_queries)
    methods = [m for m in METHODS if a.methods is None or m["method"] in a.methods]
    times = read_times(Path(a.times) if a.times else None)
    root0, root1 = Path(a.seed0), Path(a.seed1)
    k = a.k
    print(f"queries ({len(queries)}): {' '.join(queries)}")
    print(f"{'method':<42} {'Spearman [95% CI]':<26} {f'top-{k} overlap [95% CI]':<24} {'queries':>7} {'seconds':>8}")
    results = []
    for m in methods:
        per_query, missing = [], []
        for q in queries:
            p0, p1 = root0 / m["seed0"].format(q=q), root1 / m["seed1"].format(q=q)
            if not (p0.exists() and p1.exists()):
                missing.append(q)
                continue
            x, y = paired(pd.read_parquet(p0), pd.read_parquet(p1), m["column"])
            per_query.append({"query_id": q, **agreement(x, y, k), "items": len(x), "seed0_table": str(p0),
                              "seed1_table": str(p1)})
        seconds = rerun_seconds(times, m["cost"])
        row = {"method": m["method"], "column": m["column"], "redrawn": m["redrawn"], "queries": len(per_query),
               "missing": missing, "rerun_seconds": seconds, "per_query": per_query}
        if per_query:
            for metric in ("spearman", f"top{k}_overlap"):
                mean, lo, hi = interval([r[metric] for r in per_query], a.bootstrap_seed, a.resamples)
                row[metric] = {"mean": mean, "lo": lo, "hi": hi}
            s, t = row["spearman"], row[f"top{k}_overlap"]
            print(f"{m['method']:<42} {s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]{'':<6} "
                  f"{t['mean']:.1f} [{t['lo']:.1f}, {t['hi']:.1f}] / {k}{'':<5} {len(per_query):>7} "
                  f"{'-' if seconds is None else f'{seconds:.0f}':>8}")
        else:
            print(f"{m['method']:<42} {'no seed-1 tables':<26} {'':<24} {0:>7} {'-':>8}")
        results.append(row)
    items = sorted({r["items"] for m in results for r in m["per_query"]})
    chance = {n: k * k / n for n in items}  # expected top-k overlap of two independent random rankings of n items
    if chance:
        print("chance top-%d overlap (two unrelated rankings): %s" % (k, ", ".join(f"{c:.2f} of {n} items"
                                                                         for n, c in chance.items())))
    out = {"queries": queries, "chance_topk_overlap": {str(n): c for n, c in chance.items()}, "rule": None if a.queries else
           f"the first {a.num_queries} generated queries of the report half in {a.split}'s order",
           "seed0_root": str(root0), "seed1_root": str(root1), "k": k,
           "interval": f"95% bootstrap over the queries, {a.resamples} resamples, seed {a.bootstrap_seed}",
           "times": a.times, "methods": results,
           "command_seconds": [{"name": str(r.name), "seconds": float(r.seconds), "rc": int(r.rc),
                                "finished": str(r.finished)} for r in times.itertuples()]}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

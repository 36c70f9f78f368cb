"""The benchmark's tables (``musicattr benchmark``: LDS with intervals, paired differences, null, ceiling) on the
queries where every listed method has its table: for a method that has scored only part of the bank's queries
(e.g. unlearning-ekfac, one Eq. 2 + Eq. 1 pass per query), compared with the others on exactly those queries.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/peers_subset_benchmark.py --bank assets/bank/demo \
        --compare runs/demo/benchmark/compare --store runs/demo/store --out runs/demo/benchmark-peers-subset \
        --methods unlearning unlearning-ekfac ekfac trak dtrak "all-against-all[aisfx]" random
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> dict:
    from musicattr.atomic import atomic_write_json, atomic_write_text
    from musicattr.counterfactual.bank import Bank
    from musicattr.counterfactual.benchmark import bank_losses, check_compare, summarize
    from musicattr.counterfactual.methods import method_scores, parse_methods
    import musicattr.peers.methods  # noqa: F401  (registers the peers)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", default="assets/bank/demo")
    ap.add_argument("--compare", default="runs/demo/benchmark/compare")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--null_vectors", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    bank = Bank(a.bank)
    compare = Path(a.compare)
    check_compare(bank, compare)
    methods = parse_methods(a.methods)
    table = bank.queries_table()
    have = [q for q in table["query_id"] if all(m.table is None or m.path(compare, q).exists() for m in methods)]
    sub = table[table["query_id"].isin(set(have))].reset_index(drop=True)
    kinds = np.array(sub["kind"])
    qids = list(sub["query_id"])
    scores = method_scores(methods, compare, qids, bank.item_ids, a.seed, random_per_query=True)
    data = bank_losses(bank, qids)
    result, text = summarize(bank, sub, kinds, scores, data, a.bootstrap, a.null_vectors, None, a.seed)
    head = (f"Queries where every method has a table: {len(qids)} of {len(table)} "
            f"({int((kinds != 'training').sum())} non-training: {', '.join(q for q, k in zip(qids, kinds) if k != 'training')}).\n\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "benchmark.md", head + text)
    atomic_write_json(out / "benchmark.json", {"queries": qids, **json.loads(json.dumps(result, default=float))})
    print(head + text, flush=True)
    return result


if __name__ == "__main__":
    main()

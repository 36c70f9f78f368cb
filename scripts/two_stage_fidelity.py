"""The two-stage query (``musicattr query --exact_top M``) against exact Eq. 1 on the demo (a benchmark, not a test).

For each query that has both an unlearned file and its exact Eq. 1 table (``musicattr compare``'s
``<figure1>/queries/<id>/unlearned.safetensors`` and ``unlearning/scores.parquet``, made with the index's T, seed
and M_L), and each M: the recall of exact Eq. 1's top 10 within the two-stage top 10 and within the index's top M
(by tau^), the same for the relative score (and, with ``--similar_ms``, the same M with the similarity proposer
``similar_top`` = M), and the seconds per query against an exact pass (exact Eq. 1 of every
item with the baseline cached: the same scorer at M = N, on the first ``--exact_pass`` queries, whose scores are
also checked against the reference tables). Prints a table and writes JSON.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/two_stage_fidelity.py --run_root runs/demo
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicattr.attribution.query import run_query  # noqa: E402
from musicattr.fingerprint import file_fingerprint  # noqa: E402


def reference_queries(figure1: Path, index_prov: dict, pattern: str) -> list[tuple[str, Path, pd.DataFrame]]:
    """(id, unlearned file, exact Eq. 1 table) of every finished query whose table scores that file with the index's
    T, seed and M_L."""
    out = []
    for qdir in sorted(figure1.glob(pattern)):
        f, table, run = (qdir / "unlearned.safetensors", qdir / "unlearning" / "scores.parquet",
                         qdir / "unlearning" / "run.json")
        if not (f.exists() and table.exists() and run.exists()):
            continue
        r = json.loads(run.read_text())
        same = (r.get("unlearned_fingerprint") == file_fingerprint(str(f))
                and r.get("num_draws") == index_prov["num_draws"] and r.get("seed") == index_prov["seed"]
                and r.get("mask_loss") == index_prov["mask_loss"]
                and r.get("checkpoint_fingerprint") == index_prov["checkpoint_fingerprint"])
        if not same:
            print(f"skipped {qdir.name}: its exact table is not Eq. 1 of this file with the index's draws",
                  file=sys.stderr)
            continue
        out.append((qdir.name, f, pd.read_parquet(table)))
    return out


def top(df: pd.DataFrame, n: int, rank: str = "rank") -> set[int]:
    return set(df.nsmallest(n, rank)["index"].astype(int))


def offline(figure1: Path, pattern: str, ms: list[int]) -> list[dict]:
    """The candidate rule's recall from a compare run's own tables, with no query run: per query folder, exact Eq. 1
    (``unlearning/scores.parquet``), the index (``index/scores.parquet``) and all-against-all similarity. The exact
    stage re-scores the candidates with exact Eq. 1's draws, so exact Eq. 1's top 10 in the two-stage top 10 is
    exactly its top 10 within the candidates."""
    rows = []
    for qdir in sorted(figure1.glob(pattern)):
        files = [qdir / "unlearning" / "scores.parquet", qdir / "index" / "scores.parquet",
                 qdir / "all-against-all.parquet"]
        if not all(f.exists() for f in files):
            continue
        ex, ix, sim = (pd.read_parquet(f) for f in files)
        e10 = top(ex, 10)
        for m in ms:
            base = top(ix, m) | top(ix, m, "relative_rank")
            for label, c in (("index", base), ("index + similarity", base | top(sim, m))):
                rows.append({"query": qdir.name, "M": m, "candidates": label, "rows": len(c),
                             "recall10": len(e10 & c) / 10})
    return rows


def call(args, out: Path, files: list[Path], **kw) -> tuple[list[dict], float]:
    """run_query into a fresh ``out`` (no reused exact rows); (summary, wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_query(index=str(args.index), checkpoint=str(args.run_root / "fit" / "last.ckpt"),
                        fisher=str(args.run_root / "fisher.safetensors"), out_dir=str(out),
                        unlearned=[str(f) for f in files], store=str(args.run_root / "store"), relative=True,
                        top_k=0, **kw)
    return summary, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_root", type=Path, default=Path("runs/demo"))
    p.add_argument("--figure1", type=Path, default=None, help="default: <run_root>/figure1/queries")
    p.add_argument("--pattern", default="q00*", help="query folders to use (glob)")
    p.add_argument("--index", type=Path, default=None,
                   help="default: <run_root>/index (another index of the same model, e.g. projection identity)")
    p.add_argument("--ms", type=int, nargs="+", default=[10, 16, 32])
    p.add_argument("--similar_ms", type=int, nargs="*", default=[],
                   help="M values also run with the similarity proposer, similar_top = M (compare's all-against-all "
                        "tables beside the unlearned files)")
    p.add_argument("--exact_pass", type=int, default=2, help="queries whose exact pass (M = N) is timed")
    p.add_argument("--work", type=Path, default=Path("runs/bench/two_stage"))
    p.add_argument("--out", type=Path, default=Path("runs/bench/two_stage_fidelity.json"))
    p.add_argument("--offline", action="store_true",
                   help="only the candidate rules' recall from the compare run's tables (index, exact Eq. 1, "
                        "all-against-all), at --ms: no query is run")
    args = p.parse_args()
    torch.set_num_threads(1)
    figure1 = args.figure1 or args.run_root / "figure1" / "queries"
    if args.offline:
        df = pd.DataFrame(offline(figure1, args.pattern, args.ms))
        if df.empty:
            raise SystemExit(f"no query under {figure1} has its index, exact and similarity tables; fix: run compare")
        g = df.groupby(["M", "candidates"])
        table = pd.DataFrame({"queries": g["query"].nunique(), "rows per query": g["rows"].mean().round(1),
                              "recall of exact top 10, mean": (10 * g["recall10"].mean()).round(2),
                              "min": (10 * g["recall10"].min()).round(0).astype(int)})
        print(table.to_string())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": df.to_dict("records"), "command": " ".join(sys.argv)}, indent=2))
        print(f"wrote {args.out}")
        return
    args.index = args.index or args.run_root / "index"
    prov = json.loads((args.index / "index.json").read_text())["provenance"]
    n_items = json.loads((args.index / "index.json").read_text())["num_items"]
    refs = reference_queries(figure1, prov, args.pattern)
    if not refs:
        raise SystemExit(f"no query under {figure1} has an unlearned file and its exact table; fix: run compare")
    ids, files = [q for q, _, _ in refs], [f for _, f, _ in refs]
    exact = {q: t for q, _, t in refs}
    print(f"{len(ids)} queries ({', '.join(ids)}), N = {n_items}, T = {prov['num_draws']}, k = {prov['k']}")

    index_only, _ = call(args, args.work / "index", files)
    index_tables = {s["query_id"]: pd.read_parquet(Path(s["folder"]) / "scores.parquet") for s in index_only}
    rows = [{"M": 0, "label": "index alone",
             "recall10": [len(top(exact[q], 10) & top(index_tables[q], 10)) / 10 for q in ids],
             "recall10_relative": [len(top(exact[q], 10, "relative_rank") & top(index_tables[q], 10, "relative_rank"))
                                   / 10 for q in ids]}]
    for m, ms in [(m, None) for m in args.ms] + [(m, m) for m in args.similar_ms]:
        summary, wall = call(args, args.work / (f"M{m}" if ms is None else f"M{m}-sim{ms}"), files, exact_top=m,
                             similar_top=ms)
        r = {"M": m, "similar_top": ms, "label": f"two-stage M = {m}" + ("" if ms is None else f" + similarity {ms}"),
             "recall10": [], "recall10_relative": [], "recall_index_top_m": [],
             "recall_candidates": [], "candidates": [], "exact_seconds": [], "query_seconds": [], "wall_seconds": wall}
        for s in summary:
            q, t = s["query_id"], pd.read_parquet(Path(s["folder"]) / "scores.parquet")
            run = json.loads((Path(s["folder"]) / "run.json").read_text())
            e10 = top(exact[q], 10)
            r["recall10"].append(len(e10 & top(t, 10)) / 10)
            r["recall10_relative"].append(len(top(exact[q], 10, "relative_rank") & top(t, 10, "relative_rank")) / 10)
            r["recall_index_top_m"].append(len(e10 & top(index_tables[q], m)) / 10)
            r["recall_candidates"].append(len(e10 & set(t.loc[t["exact"], "index"].astype(int))) / 10)
            r["candidates"].append(int(t["exact"].sum()))
            r["exact_seconds"].append(run["two_stage"]["seconds"])
            r["query_seconds"].append(run["query_seconds"] + run["lookup_seconds"] / len(summary)
                                      + run["two_stage"]["seconds"])
        rows.append(r)

    n_pass = min(args.exact_pass, len(ids))
    summary, wall = call(args, args.work / "exact_pass", files[:n_pass], exact_top=n_items)
    exact_pass, agreement = [], []
    for s in summary:
        t = pd.read_parquet(Path(s["folder"]) / "scores.parquet").set_index("index").sort_index()
        ref = exact[s["query_id"]].set_index("index").sort_index()
        exact_pass.append(json.loads((Path(s["folder"]) / "run.json").read_text())["two_stage"]["seconds"])
        agreement.append({"query_id": s["query_id"], "max_abs_diff": float((t["score"] - ref["score"]).abs().max()),
                          "max_abs_score": float(ref["score"].abs().max()),
                          "max_loss": float(ref["baseline_loss"].abs().max()),
                          "same_top10": top(t.reset_index(), 10) == top(ref.reset_index(), 10)})
    pass_s = float(np.mean(exact_pass))

    print(f"\nexact pass (exact Eq. 1 of all {n_items} items, baseline cached, {n_pass} queries): {pass_s:.1f} s per "
          f"query; against the reference tables: max |diff| {max(a['max_abs_diff'] for a in agreement):.2e} "
          f"(max |tau| {max(a['max_abs_score'] for a in agreement):.2e}), same top 10: "
          f"{all(a['same_top10'] for a in agreement)}")
    head = ("| M | exact rows per query | recall of exact top 10 in two-stage top 10, mean (min) | in the index's "
            "top M by tau^ | in the candidates | relative: in two-stage top 10 | s per query (exact part) | "
            "/ exact pass |")
    print("\n" + head + "\n" + "|---" * 8 + "|")
    for r in rows:
        rec = f"{np.mean(r['recall10']):.3f} ({min(r['recall10']):.1f})"
        rel = f"{np.mean(r['recall10_relative']):.3f} ({min(r['recall10_relative']):.1f})"
        if r["M"] == 0:
            print(f"| index alone | 0 | {rec} | — | — | {rel} | — | — |")
            continue
        im = f"{np.mean(r['recall_index_top_m']):.3f} ({min(r['recall_index_top_m']):.1f})"
        rc = f"{np.mean(r['recall_candidates']):.3f}"
        qs, es = float(np.mean(r["query_seconds"])), float(np.mean(r["exact_seconds"]))
        name = r["M"] if r.get("similar_top") is None else f"{r['M']} + similarity {r['similar_top']}"
        print(f"| {name} | {np.mean(r['candidates']):.1f} | {rec} | {im} | {rc} | {rel} | {qs:.2f} ({es:.2f}) | "
              f"{qs / pass_s:.1%} |")
    result = {"queries": ids, "num_items": n_items, "num_draws": prov["num_draws"], "k": prov["k"],
              "exact_pass_seconds": exact_pass, "exact_pass_agreement": agreement, "rows": rows,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "processor": platform.processor()},
              "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

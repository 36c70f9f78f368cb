"""Per-method provenance for a shipped-scores folder whose manifest predates it (format 1), reconstructed from the
folder's git history: each (method, query) column is attributed to the earliest commit whose table holds exactly
the values shipped now (so a column restored to earlier values keeps its first export); source is the compare
runs that commit's manifest added (else the benchmark's compare root), made its manifest's export time.

    python scripts/scores_provenance_from_git.py --scores assets/bank/demo/scores     # rewrites its manifest.json
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess

import numpy as np
import pandas as pd


def _show(commit: str, path: str) -> bytes | None:
    r = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True)
    return r.stdout if r.returncode == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", default="assets/bank/demo/scores")
    p.add_argument("--compare_root", default="runs/demo/benchmark/compare",
                   help="the source of an export that added no new compare run to the manifest")
    a = p.parse_args()
    d = a.scores.rstrip("/")
    commits = subprocess.run(["git", "log", "--reverse", "--format=%h", "--", d], capture_output=True, text=True,
                             check=True).stdout.split()
    head = json.load(open(f"{d}/manifest.json"))
    final = {n: pd.read_parquet(f"{d}/{f}").set_index("item_id") for n, f in head["methods"].items()}
    hist, seen = [], []
    for c in commits:
        raw = _show(c, f"{d}/manifest.json")
        if raw is None:
            continue
        m = json.loads(raw)
        src = [x for x in m["source"].split("; ") if x]
        new, seen = [x for x in src if x not in seen], src
        tabs = {n: pd.read_parquet(io.BytesIO(b)).set_index("item_id")
                for n, f in m["methods"].items() if (b := _show(c, f"{d}/{f}")) is not None}
        hist.append((c, m["made"], "; ".join(new) or a.compare_root, tabs))
    prov = {}
    for n, df in final.items():
        entries: dict[tuple, list[str]] = {}
        for q in df.columns:
            hit = next(((c, made, src) for c, made, src, tabs in hist if n in tabs and q in tabs[n].columns and
                        np.array_equal(tabs[n][q].reindex(df.index).to_numpy(), df[q].to_numpy(), equal_nan=True)),
                       None)
            if hit is None:
                raise SystemExit(f"{d}: {n} {q}: no commit holds the shipped values; fix: commit the folder first")
            entries.setdefault(hit, []).append(q)
        prov[n] = [{"source": src, "made": made, "queries": qs,
                    "note": f"reconstructed from git history: first shipped in commit {c}, made = its export time"}
                   for (c, made, src), qs in entries.items()]
        for e in prov[n]:
            print(f"{n}: {len(e['queries'])} queries ({e['queries'][0]} to {e['queries'][-1]}) {e['note']}")
    head["format"], head["provenance"] = 2, {n: prov[n] for n in sorted(prov)}
    with open(f"{d}/manifest.json", "w") as f:
        json.dump(head, f, indent=2)


if __name__ == "__main__":
    main()

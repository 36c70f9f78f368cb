"""The README's 44-query table ("The first 44 queries") from `musicattr benchmark`'s three halves (prints markdown).

Reads ``<dir>/benchmark.json`` (all non-training queries), ``benchmark-tuning.json`` and ``benchmark-report.json``
(the split of assets/bank/demo/queries/split.csv) and the draw-seed overlap of ``scripts/benchmark_seed_overlap.py``;
every figure in the table is one of theirs (paired differences read as "row minus column", with * where the 95%
interval excludes zero).

    .venv/bin/python scripts/peers_table.py --dir runs/demo/benchmark-peers
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [("unlearning", "Eq. 1 (`unlearning`)"), ("unlearning-relative", "relative (`unlearning-relative`)"),
        ("index", "index (k = 2^15)"), ("index-ensemble", "index ensemble (`index-ensemble`, 3 models)"),
        ("unlearning-ekfac", "AbU+ (`unlearning-ekfac`)"), ("ekfac", "EK-FAC influence (`ekfac`)†"),
        ("trak", "TRAK (`trak`, k = 2048)†"), ("dtrak", "D-TRAK (`dtrak`, k = 2048)†"),
        ("all-against-all[aisfx]", "similarity (`all-against-all[aisfx]`)"), ("random", "random (one vector per query)")]
SIMILARITY = "all-against-all[aisfx]"


def lds(res: dict, m: str) -> str:
    v = res["lds"].get(m)
    return f"{v['lds']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v else ""


def paired(res: dict, a: str, b: str) -> str:
    """a minus b from the pairs table (either order), '' when absent or a == b."""
    if a == b:
        return ""
    p, sign = res["pairs"].get(f"{a} - {b}"), 1
    if p is None:
        p, sign = res["pairs"].get(f"{b} - {a}"), -1
    if p is None:
        return ""
    d, (lo, hi) = sign * p["diff"], sorted(sign * x for x in p["ci"])
    return f"{d:+.3f}{'*' if lo > 0 or hi < 0 else ''} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("runs/demo/benchmark-peers"))
    ap.add_argument("--overlap", type=Path, default=Path("docs/evidence/benchmark_seed_overlap.json"))
    ap.add_argument("--best", default="index-ensemble", help="the column 'minus <best>' (report half)")
    ap.add_argument("--peer", default="unlearning-ekfac", help="the column 'minus <peer>' (report half)")
    a = ap.parse_args()
    res = {h: json.loads((a.dir / f"benchmark{s}.json").read_text())
           for h, s in (("all", ""), ("tuning", "-tuning"), ("report", "-report"))}
    overlap = {}
    if a.overlap.exists():
        overlap = {m["method"]: m["top10_overlap"] for m in json.loads(a.overlap.read_text())["methods"]}
    print(f"retrains {res['all']['retrains']}; methods {', '.join(res['all']['methods'])}\n")
    print(f"| method | LDS, all [95% CI] | tuning half | **report half (held back)** | minus {a.best}, report half "
          f"(paired) | minus {a.peer}, report half | minus similarity, all | minus similarity, report half | "
          "top-10 overlap, two draw seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, name in ROWS:
        if m not in res["all"]["lds"]:
            continue
        o = overlap.get(m)
        ov = f"{o['mean']:.1f} [{o['lo']:.1f}, {o['hi']:.1f}]" if o else ("no draws" if m == SIMILARITY else "")
        print(f"| {name} | {lds(res['all'], m)} | {lds(res['tuning'], m)} | {lds(res['report'], m)} | "
              f"{paired(res['report'], m, a.best)} | {paired(res['report'], m, a.peer)} | "
              f"{paired(res['all'], m, SIMILARITY)} | {paired(res['report'], m, SIMILARITY)} | {ov} |")
    print("\n† the last column (scripts/benchmark_seed1.sh) was measured with 32 query draws (TRAK and D-TRAK at "
          "k = 512); the LDS columns with the config's 128 (and k = 2048)")
    c = res["all"]["ceiling"]
    print(f"\nceiling {c['ceiling']:.3f} [{c['ceiling_ci'][0]:.3f}, {c['ceiling_ci'][1]:.3f}] ({c['pairs']} pairs, "
          f"{c['subsets']} subsets); null {res['all']['null']['mean']:.3f} [{res['all']['null']['lo']:.3f}, "
          f"{res['all']['null']['hi']:.3f}]")
    e = res["all"]["pairs"].get(f"unlearning - {SIMILARITY}")
    if e:
        print(f"Eq. 1 minus similarity, all: half-width {e['half_width']:.3f}")
    for h in ("all", "report"):
        for k in ("random_k", "top_k", "groups"):
            if k in res[h]:
                print(f"{h} {k}: {json.dumps(res[h][k])[:800]}")


if __name__ == "__main__":
    main()

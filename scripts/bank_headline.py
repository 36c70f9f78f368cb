"""The README's headline counterfactual table, its evidence file and the interval target, in one command.

Runs ``musicattr benchmark`` on the scores shipped in the bank (every method of configs/demo/benchmark.yaml, the
first M LDS subsets, all query batches) for all non-training queries and for the held-back report half, then
``scripts/width_seeds.py``'s run per further bootstrap seed (the paired interval of Eq. 1 and the similarity
baseline under several seeds, seed 0's from the first run: the target half-width <= 0.05 holds only if it holds for
every seed). Writes

    docs/evidence/bank_split_<M>_subsets_<Q>_queries_all_methods.md

(a "Made by" line with the commit, date and seconds; both benchmark tables; the seeds' half-widths) and prints the
README's headline rows: per method the LDS [95% CI] on all queries and on the report half, and Eq. 1 minus it,
paired, on both (* where the paired 95% interval excludes zero).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bank_headline.py --subsets 320
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from peers_table import lds, paired  # noqa: E402
from width_seeds import (benchmark_cmd, benchmark_pair, row_line, seed_row, summarize,  # noqa: E402
                         summary_line)

ROWS = [("unlearning", "Eq. 1 (`unlearning`)"), ("unlearning-relative", "relative (`unlearning-relative`)"),
        ("index", "index"), ("index-ensemble", "index ensemble"), ("unlearning-ekfac", "AbU+ (`unlearning-ekfac`)"),
        ("ekfac", "EK-FAC influence (`ekfac`)"), ("dtrak", "D-TRAK (`dtrak`, k = 2048)"),
        ("trak", "TRAK (`trak`, k = 2048)"), ("all-against-all[aisfx]", "similarity (`all-against-all[aisfx]`)"),
        ("random", "random")]
LEADERS = ("index-ensemble", "unlearning-ekfac", "ekfac")
REFERENCE = "unlearning"
SIMILARITY = "all-against-all[aisfx]"


def headline_rows(res_all: dict, res_report: dict, reference: str = REFERENCE) -> list[str]:
    """The README's headline table (markdown lines) from the two halves' benchmark.json."""
    n_all, n_rep = res_all["lds_queries"], res_report["lds_queries"]
    lines = [f"| method | LDS, {n_all} queries [95% CI] | report half, {n_rep} queries (held back) | "
             f"Eq. 1 minus it, {n_all} (paired) | Eq. 1 minus it, report half |", "|---|---|---|---|---|"]
    for m, name in ROWS:
        if m not in res_all["lds"]:
            continue
        lines.append(f"| {name} | {lds(res_all, m)} | {lds(res_report, m)} | {paired(res_all, reference, m)} | "
                     f"{paired(res_report, reference, m)} |")
    return lines


def leaders_lines(res_all: dict, res_report: dict) -> list[str]:
    """Each pair of the leading methods, and each leader minus D-TRAK, on both halves."""
    out = []
    pairs = [(a, b) for i, a in enumerate(LEADERS) for b in LEADERS[i + 1:]] + [(a, "dtrak") for a in LEADERS]
    for a, b in pairs:
        if a in res_all["lds"] and b in res_all["lds"]:
            out.append(f"- {a} minus {b}: {paired(res_all, a, b)} (report half {paired(res_report, a, b)})")
    return out


def run_benchmark(subsets: int, batches: str, half: str, out: Path) -> dict:
    """Every method of the config on the shipped scores (bootstrap seed 0), one half of the queries."""
    subprocess.run(benchmark_cmd(None, 0, subsets, batches, out, half), check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    suffix = "" if half == "all" else f"-{half}"
    return {"json": json.loads((out / f"benchmark{suffix}.json").read_text()),
            "md": (out / f"benchmark{suffix}.md").read_text()}


def evidence_text(made_by: str, all_md: str, report_md: str, width: dict | None) -> str:
    """The evidence file: how it was made, the two benchmark tables, the seeds' half-widths."""
    parts = [f"Made by: {made_by}", "", all_md.rstrip(), "", "# Report half (held back)", "", report_md.rstrip(), ""]
    if width is not None:
        parts += ["# The paired interval of Eq. 1 and the similarity baseline over bootstrap seeds", "",
                  "| bootstrap seed | difference [95% CI] | half-width | queries alone | subsets alone |",
                  "|---|---|---|---|---|"]
        parts += [f"| {r['seed']} | {r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['half_width']:.4f} | "
                  f"{r['queries_alone']:.3f} | {r['subsets_alone']:.3f} |" for r in width["seeds"]]
        parts += ["", f"Mean {width['mean']:.4f}, SD {width['sd']:.4f}, largest {width['max']:.4f}; "
                      f"<= {width['target']} for every seed: {width['every_seed_meets_target']}.", ""]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subsets", type=int, required=True, help="the first M LDS subsets (every one must be finished)")
    p.add_argument("--batches", default="[0, 1, 2]")
    p.add_argument("--seeds", default="0,1,2", help="bootstrap seeds for the half-width (comma-separated)")
    p.add_argument("--out_dir", type=Path, default=None, help="default runs/demo/bank-headline-<M>")
    p.add_argument("--evidence", type=Path, default=None, help="default docs/evidence/bank_split_<M>_subsets_..."
                   "_queries_all_methods.md")
    a = p.parse_args()
    out = a.out_dir or ROOT / "runs" / "demo" / f"bank-headline-{a.subsets}"
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()     # before the run: `make bank --commit true` may add commits
    seeds = [int(x) for x in a.seeds.split(",")]
    if len(seeds) < 2:
        p.error("--seeds: at least two seeds, e.g. 0,1,2 (one seed has no spread)")
    t0 = time.time()
    res = {"all": run_benchmark(a.subsets, a.batches, "all", out)}
    first = time.time() - t0
    res["report"] = run_benchmark(a.subsets, a.batches, "report", out)
    print(f"benchmark, both halves: {time.time() - t0:.0f} s", flush=True)
    rows = []
    for seed in seeds:         # seed 0's pair is the all-queries run's own (the same bootstrap draws): not run again
        t1 = time.time()
        pair = (res["all"]["json"]["pairs"][f"{REFERENCE} - {SIMILARITY}"] if seed == 0 else
                benchmark_pair(REFERENCE, SIMILARITY, seed, a.subsets, a.batches, out / f"seed-{seed}"))
        rows.append(seed_row(pair, seed, first if seed == 0 else time.time() - t1))
        print(row_line(REFERENCE, SIMILARITY, rows[-1]), flush=True)
    width = summarize(REFERENCE, SIMILARITY, a.subsets, a.batches, 0.05, rows)
    print(summary_line(width), flush=True)
    (out / "width_seeds.json").write_text(json.dumps(width, indent=1) + "\n")
    seconds = time.time() - t0
    ra, rr = res["all"]["json"], res["report"]["json"]
    made_by = (f"`OMP_NUM_THREADS=1 .venv/bin/python scripts/bank_headline.py --subsets {a.subsets} --batches "
               f"'{a.batches}' --seeds {a.seeds}` at commit {commit}, {datetime.date.today().isoformat()}, "
               f"{seconds:.0f} s: `musicattr benchmark --config configs/demo/benchmark.yaml --store null --scores "
               f"assets/bank/demo/scores --subsets {a.subsets} --batches '{a.batches}'` (every method of the config), "
               f"the same with `--half report`, then `scripts/width_seeds.py` over bootstrap seeds {a.seeds}. "
               f"{ra['lds_queries']} non-training queries, the first {ra['lds_subsets']} LDS subsets; bank: "
               f"{ra['retrains']} finished retrains.")
    evidence = a.evidence or (ROOT / "docs" / "evidence" /
                              f"bank_split_{a.subsets}_subsets_{ra['lds_queries']}_queries_all_methods.md")
    evidence.write_text(evidence_text(made_by, res["all"]["md"], res["report"]["md"], width))
    print("\n".join(headline_rows(ra, rr)))
    print("\n" + "\n".join(leaders_lines(ra, rr)))
    c = ra["ceiling"]
    print(f"\nceiling {c['ceiling']:.3f} [{c['ceiling_ci'][0]:.3f}, {c['ceiling_ci'][1]:.3f}]; null "
          f"{ra['null']['mean']:.3f} [{ra['null']['lo']:.3f}, {ra['null']['hi']:.3f}]")
    e = ra["pairs"][f"{REFERENCE} - {SIMILARITY}"]
    print(f"Eq. 1 minus similarity: half-width {e['half_width']:.4f} ({e['half_width_queries_alone']:.3f} from the "
          f"queries, {e['half_width_subsets_alone']:.3f} from the subsets); over seeds {a.seeds}: largest "
          f"{width['max']:.4f}, every seed <= {width['target']}: {width['every_seed_meets_target']}")
    print(f"evidence: {evidence.relative_to(ROOT) if evidence.is_relative_to(ROOT) else evidence}")


if __name__ == "__main__":
    main()

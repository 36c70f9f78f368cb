"""The paired interval of two methods under several bootstrap seeds: how much its half-width moves with the
bootstrap's own random draws (the benchmark prints one seed's; a target such as "half-width <= 0.05" is met only
if it holds for every seed, not for a lucky one).

Runs ``musicattr benchmark`` on the shipped scores once per seed (``--seed s``: the bootstrap's draws of queries
and subsets; the two methods' scores are fixed tables) and prints, per seed, the difference a - b, its 95% interval
and half-width, then the half-width's mean, sample SD and largest value.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/width_seeds.py --subsets 201 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def benchmark_cmd(methods: list[str] | None, seed: int, subsets: int | None, batches: str, out: Path,
                  half: str = "all") -> list[str]:
    """``musicattr benchmark`` on the shipped scores (``methods`` None: every method of the config)."""
    cmd = [str(Path(sys.executable).with_name("musicattr")), "benchmark", "--config", "configs/demo/benchmark.yaml",
           "--store", "null", "--scores", "assets/bank/demo/scores", "--batches", batches, "--seed", str(seed),
           "--out_dir", str(out)]
    if methods is not None:
        cmd += ["--methods", json.dumps(methods)]
    if subsets is not None:
        cmd += ["--subsets", str(subsets)]
    if half != "all":
        cmd += ["--half", half]
    return cmd


def benchmark_pair(a: str, b: str, seed: int, subsets: int | None, batches: str, out: Path) -> dict:
    """One ``musicattr benchmark`` run on the shipped scores of methods a and b; the pair's entry of its JSON."""
    subprocess.run(benchmark_cmd([a, b], seed, subsets, batches, out), check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "benchmark.json").read_text())["pairs"][f"{a} - {b}"]


def seed_row(pair: dict, seed: int, seconds: float) -> dict:
    """One seed's figures from a benchmark.json pair entry."""
    return {"seed": seed, "diff": pair["diff"], "ci": pair["ci"], "half_width": pair["half_width"],
            "queries_alone": pair.get("half_width_queries_alone"),
            "subsets_alone": pair.get("half_width_subsets_alone"), "seconds": round(seconds)}


def row_line(a: str, b: str, r: dict) -> str:
    return (f"seed {r['seed']}: {a} - {b} = {r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}], "
            f"half-width {r['half_width']:.4f} (queries alone {r['queries_alone']:.3f}, subsets alone "
            f"{r['subsets_alone']:.3f}; {r['seconds']} s)")


def summarize(a: str, b: str, subsets: int | None, batches: str, target: float, rows: list[dict]) -> dict:
    """The half-width's mean, sample SD and largest value over the seeds' rows, and whether every seed meets target."""
    widths = [r["half_width"] for r in rows]
    return {"a": a, "b": b, "subsets": subsets, "batches": batches, "target": target,
            "mean": statistics.mean(widths), "sd": statistics.stdev(widths), "max": max(widths),
            "every_seed_meets_target": max(widths) <= target, "seeds": rows}


def summary_line(summary: dict) -> str:
    return (f"half-width over {len(summary['seeds'])} bootstrap seeds: mean {summary['mean']:.4f}, SD "
            f"{summary['sd']:.4f}, largest {summary['max']:.4f}; <= {summary['target']} for every seed: "
            f"{summary['every_seed_meets_target']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="unlearning")
    p.add_argument("--b", default="all-against-all[aisfx]")
    p.add_argument("--subsets", type=int, default=None, help="the first N LDS subsets (default: every finished)")
    p.add_argument("--batches", default="[0, 1, 2]", help="the bank's query batches")
    p.add_argument("--seeds", default="0,1,2", help="bootstrap seeds (comma-separated)")
    p.add_argument("--target", type=float, default=0.05, help="the half-width target to check every seed against")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        p.error("--seeds: at least two seeds, e.g. 0,1,2 (one seed has no spread)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            t0 = time.time()
            pair = benchmark_pair(args.a, args.b, seed, args.subsets, args.batches, Path(tmp) / f"seed-{seed}")
            rows.append(seed_row(pair, seed, time.time() - t0))
            print(row_line(args.a, args.b, rows[-1]), flush=True)
    summary = summarize(args.a, args.b, args.subsets, args.batches, args.target, rows)
    print(summary_line(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The draw budget that reproducible credit needs, measured (a benchmark: prints figures, writes JSON).

For each unlearned query, the store is scored with T_max draws under each of two draw seeds, and every draw's
difference d_ij = L_j(z_i, theta_u) - L_j(z_i, theta0) is kept. Draw j is a pure function of (seed, key, j)
(the task's draw design), so the first T draws of a T_max pass are exactly the design's pass at T: one pass per
seed measures the two seeds' agreement at every T <= T_max (``--budgets``),

    tau_i(T) = (1/T) sum_{j<T} d_ij,   SE_i(T) = sd_{j<T}(d_ij) / sqrt(T),

compared as ``scripts/reproducibility.py`` compares two passes (Spearman, top-10 overlap, credit-share L1 with the
report's rule, how many of the top 10 are clear of rank 11). The smallest measured T that meets each goal
(``--goal``: Spearman, top-10, share L1) is printed per query and for the mean over the queries; "not reached"
when even T_max does not. Cost is T / 32, the demo's former plain pass.

Resumable: the per-draw losses are computed ``--chunk`` draws at a time and kept on disk under
``<out folder>/draws/`` (theta0's chunks are shared by every query; theta_u's are keyed by the unlearned file);
theta0's per-draw losses already cached by ``scripts/reproducibility.py`` (``baselines/``) are reused.

    python scripts/reproducibility_curve.py --unlearned runs/demo/unlearned/q000.safetensors --max_draws 384
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproducibility import compare, interval, parse_design  # noqa: E402

from musicattr.attribution.score import swapped  # noqa: E402
from musicattr.attribution.unlearn import load_unlearned  # noqa: E402
from musicattr.data.datamodules import collate_items  # noqa: E402
from musicattr.data.latent_store import LatentStore  # noqa: E402
from musicattr.fingerprint import file_fingerprint  # noqa: E402
from musicattr.models.sat_task import SATDiffusionTask  # noqa: E402

GOALS = {"spearman": (">=", 0.97), "top10_overlap": (">=", 9), "share_l1": ("<=", 0.15)}


def per_draw(compute, file: Path, reuse=None) -> torch.Tensor:
    """[N, C] per-draw losses of one chunk: from ``file``, else from ``reuse()`` (a slice of a cache made by
    another script), else computed and written (atomically, so an interrupted run leaves no half file)."""
    if file.exists():
        return torch.load(file)
    losses = reuse() if reuse is not None else None
    if losses is None:
        losses = compute()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save(losses, tmp)
    tmp.replace(file)
    return losses


def baseline_slice(folder: Path, stem: str, first: int, n: int):
    """theta0's draws first .. first + n from a ``reproducibility.py`` baseline of this design and seed (a list
    of [B, T] tensors per batch, T >= first + n), or None."""
    best = None
    for p in folder.glob(f"{stem}-T*.pt"):
        m = re.fullmatch(re.escape(stem) + r"-T(\d+)\.pt", p.name)
        if m and int(m.group(1)) >= first + n:
            best = p
            break
    if best is None:
        return None
    return lambda: torch.cat(torch.load(best), 0)[:, first:first + n].clone()


def losses(task, model, batches, seed: int, first: int, n: int, params=None, unlearned=None) -> torch.Tensor:
    """[N, n] per-draw losses of draws first .. first + n of every item (theta0, or theta_u when given)."""
    out = []
    with torch.no_grad():
        for b in batches:
            if unlearned is None:
                out.append(task.draw_losses(model, b, seed, n, draws_per_forward=16, draw_offset=first))
            else:
                with swapped(params, unlearned):
                    out.append(task.draw_losses(model, b, seed, n, draws_per_forward=16, draw_offset=first))
    return torch.cat(out, 0)


def reached(values: dict[int, float], metric: str):
    """The smallest budget T whose value meets the goal of ``metric``, or None."""
    op, goal = GOALS[metric]
    ok = [t for t, v in sorted(values.items()) if (v >= goal if op == ">=" else v <= goal)]
    return ok[0] if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_root", default="runs/demo")
    ap.add_argument("--checkpoint", help="theta0 (default <run_root>/fit/last.ckpt)")
    ap.add_argument("--store", help="the latent store (default <run_root>/store)")
    ap.add_argument("--unlearned", nargs="+", help="unlearned files (default <run_root>/unlearned/q000.safetensors)")
    ap.add_argument("--design", default="stratified-8+shared", help="timesteps[+shared] (the attribute default)")
    ap.add_argument("--max_draws", type=int, default=256)
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128, 192, 256, 320, 384, 512])
    ap.add_argument("--seeds", nargs=2, type=int, default=[0, 1])
    ap.add_argument("--chunk", type=int, default=32, help="draws per cached chunk (a multiple of the strata)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--out", help="JSON (default <run_root>/reproducibility/curve.json)")
    a = ap.parse_args()
    a.checkpoint = a.checkpoint or f"{a.run_root}/fit/last.ckpt"
    a.store = a.store or f"{a.run_root}/store"
    a.unlearned = a.unlearned or [f"{a.run_root}/unlearned/q000.safetensors"]
    out = Path(a.out or f"{a.run_root}/reproducibility/curve.json")
    if a.max_draws % a.chunk:
        sys.exit(f"--max_draws {a.max_draws} is not a multiple of --chunk {a.chunk}; fix: pick multiples")
    budgets = sorted(t for t in set(a.budgets) | {a.max_draws} if t <= a.max_draws)
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))

    timesteps, _, _, shared = parse_design(a.design + ":32")
    task = SATDiffusionTask(timesteps=timesteps, shared_draws=bool(shared))
    model = task.load(a.checkpoint)
    named = dict(task.net(model).named_parameters())
    store = LatentStore(a.store)
    batches = [collate_items([store[p] for p in range(s, min(len(store), s + a.batch_size))])
               for s in range(0, len(store), a.batch_size)]
    ck = file_fingerprint(a.checkpoint)
    cache = out.parent / "draws"
    design = timesteps + shared
    print(f"{len(store)} items; design {design}; seeds {a.seeds}; T_max {a.max_draws}; budgets {budgets}")

    rows = []
    for path in a.unlearned:
        tensors, meta = load_unlearned(path)
        params = {k: named[k] for k in tensors}
        unlearned = {k: v.to(named[k].dtype) for k, v in tensors.items()}
        up = file_fingerprint(path)
        d = {}
        t0 = time.perf_counter()
        for s in a.seeds:
            stem = f"{ck}-{store.fingerprint}-{design}-s{s}"
            parts = []
            for first in range(0, a.max_draws, a.chunk):
                base = per_draw(lambda: losses(task, model, batches, s, first, a.chunk),
                                cache / f"{stem}-theta0-{first}+{a.chunk}.pt",
                                baseline_slice(out.parent / "baselines", stem, first, a.chunk))
                unl = per_draw(lambda: losses(task, model, batches, s, first, a.chunk, params, unlearned),
                               cache / f"{stem}-{up}-{first}+{a.chunk}.pt")
                parts.append(unl - base)
                print(f"  {meta['query_id']} seed {s}: draws {first + a.chunk}/{a.max_draws} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            d[s] = torch.cat(parts, 1).numpy()
        row = {"query_id": meta["query_id"], "unlearned": path, "unlearned_fingerprint": up, "design": design,
               "checkpoint": a.checkpoint, "store": a.store, "seeds": list(a.seeds), "budgets": {}}
        for t in budgets:
            passes = [(x[:, :t].mean(1), x[:, :t].std(1, ddof=1) / t ** 0.5) for x in (d[s] for s in a.seeds)]
            row["budgets"][str(t)] = {"cost": t / 32, **compare(*passes)}
        row["reached"] = {m: reached({int(t): v[m] for t, v in row["budgets"].items()}, m) for m in GOALS}
        rows.append(row)
        print(f"{'query':<6} {'T':>4} {'cost':>5} {'spearman':>9} {'top10':>6} {'share L1':>9} {'clear':>6}")
        for t, v in row["budgets"].items():
            print(f"{row['query_id']:<6} {t:>4} {v['cost']:>4.1f}x {v['spearman']:>9.3f} {v['top10_overlap']:>4}/10 "
                  f"{v['share_l1']:>9.2f} {v['top10_separated']:>4}/10")
        print("  goal reached at T = " + ", ".join(f"{m} {row['reached'][m] or 'not by ' + str(a.max_draws)}"
                                                    for m in GOALS), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))

    mean = {}
    print("\nmean over queries (95% bootstrap interval over queries)")
    for t in budgets:
        got = [r["budgets"][str(t)] for r in rows]
        mean[str(t)] = {m: dict(zip(("mean", "lo", "hi"), interval([g[m] for g in got]))) for m in GOALS}
        print(f"  T {t:>4} ({t / 32:.1f}x) " + "  ".join(
            f"{m} {mean[str(t)][m]['mean']:.3f} [{mean[str(t)][m]['lo']:.3f}, {mean[str(t)][m]['hi']:.3f}]"
            for m in GOALS))
    hit = {m: reached({int(t): v[m]["mean"] for t, v in mean.items()}, m) for m in GOALS}
    print("  goal reached on the mean at T = " + ", ".join(f"{m} {hit[m] or 'not by ' + str(a.max_draws)}"
                                                          for m in GOALS))
    out.with_name(out.stem + "_summary.json").write_text(json.dumps(
        {"design": design, "queries": [r["query_id"] for r in rows], "mean": mean, "reached": hit}, indent=1))
    print(f"written: {out} and {out.with_name(out.stem + '_summary.json')}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The attribution index at a million tracks: precision fidelity, build-write throughput, query time and memory.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/index_scale.py        (make index-scale; about 15 min, 1 thread)

1. Fidelity of the stored precisions on a real index (default the demo benchmark's, runs/demo/benchmark/index,
   with the psi of its compare run's unlearned files): each precision's index scores against float32's,
   Spearman over all items and top-10 overlap per query, and the largest error against its bound.
2. Synthetic indexes at N = 10^4, 10^5, 10^6 at the k of configs/demo/index.yaml and configs/paper/index.yaml
   (one run where they agree). Rows phi_i = c_i W + e_i: a rank-16 part (c_i Student-t, 3 d.o.f.) holding a
   quarter of the energy and noise e_i, row norms log-normal (sd 0.23): the demo index has 33% of its energy
   in its top 16 directions and row log-norms of sd 0.23. Queries psi = W^T d + noise. For each N:
     write      encode (``index_store.encode``) + write the shards (``write_index``); generation timed apart
     exact      the streamed exact top-10 of 8 queries in one pass, the shards dropped from the page cache
                first (posix_fadvise DONTNEED on our files): a query from disk
     faiss      the same top-10 with faiss.IndexFlatIP per block (checked equal to the streamed one)
     approx     the sketch folded to k_c = 256 held in memory, a flat scan of it (faiss.IndexFlatIP) proposing
                1000 candidates re-scored exactly at k: its build, its time per query, its memory, and its
                recall@10 against the exact top-10 (also at 4000 candidates, and with an IVF, faiss.IndexIVFFlat,
                sqrt(N) lists, 16 or 64 probed, in place of the flat scan)
   with the peak resident set of each phase (psutil, sampled every 10 ms). An N whose shards would pass
   --max_gb is replaced by the largest N that fits (a multiple of 10^4), and 10^6 is extrapolated with the
   exponent fitted over the measured N (time ~ N^b, printed with its arithmetic). The shards of each N are
   deleted before the next. Writes --out (JSON) and prints the tables.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicattr.attribution.index import AttributionIndex  # noqa: E402
from musicattr.attribution.index_store import PRECISIONS, bytes_per_item, error_bound, stream, write_index  # noqa: E402

RANK, SIGNAL, LOGNORM_SD = 16, 0.25, 0.23
# (coarse search, lists probed, candidates re-scored) of the approximate search; the first is the headline setting
SWEEP = [("flat", 1, 1000), ("flat", 1, 4000), ("ivf", 16, 1000), ("ivf", 64, 1000)]


class Peak:
    """Peak resident set (bytes) of this process while the block runs, sampled every 10 ms."""

    def __enter__(self):
        try:
            import psutil

            self.proc = psutil.Process()
        except ImportError:  # the lifetime peak (ru_maxrss) instead of the phase's
            import resource

            rss = type("Rss", (), {"rss": property(lambda _: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)})
            self.proc = type("Proc", (), {"memory_info": lambda _: rss()})()
        self.stop = False
        self.peak = self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------- 1. fidelity of the precisions on a real index
def fidelity(index_dir: str, checkpoint: str, fisher: str, store: str, unlearned: str, work: Path,
             k_c: int = 256) -> dict | None:
    from musicattr.attribution.query import open_query, project

    files = sorted(glob.glob(unlearned))
    if not (Path(index_dir) / "index.json").exists() or not files:
        print(f"[fidelity] skipped: no index at {index_dir} or no unlearned files {unlearned}")
        return None
    ctx = open_query(index_dir, checkpoint, fisher, store)
    idx = ctx.index
    psi = torch.stack([project(ctx.projection, ctx.from_unlearned(f)[0]) for f in files], 1)
    del ctx  # the model and the Fisher: not part of what the scale runs measure
    phi = np.zeros((idx.num_items, idx.k), dtype=np.float32)
    for pos, rows in stream(idx.root, idx.items, idx.k):
        phi[pos] = rows
    ref = idx.scores(psi)
    out = {"index": index_dir, "items": idx.num_items, "k": idx.k, "queries": len(files), "precisions": {}}
    print(f"[fidelity] {index_dir}: N = {idx.num_items}, k = {idx.k}, {len(files)} queries (psi of {unlearned})")
    print("  precision  bytes/item  Spearman mean (min)   top-10 mean (min)   max |err| / bound   max |err| / max |tau|")
    for precision in PRECISIONS:
        folder = work / f"fidelity-{precision}"
        shutil.rmtree(folder, ignore_errors=True)
        write_index(folder, [(phi, idx.items["sensitivity"].to_numpy(), idx.items["baseline_loss"].to_numpy())],
                    idx.k, precision)
        tau = AttributionIndex(folder).scores(psi)
        rho = [spearman(tau[:, c], ref[:, c]) for c in range(ref.shape[1])]
        top = [len(set(np.argsort(-tau[:, c])[:10]) & set(np.argsort(-ref[:, c])[:10])) for c in range(ref.shape[1])]
        bound = error_bound(phi, psi.float().numpy(), precision)
        err = np.abs(tau - ref)
        ratio = float((err / np.where(bound > 0, bound, np.inf)).max()) if precision != "float32" else 0.0
        out["precisions"][precision] = {"bytes_per_item": bytes_per_item(idx.k, precision),
                                        "spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
                                        "top10_mean": float(np.mean(top)), "top10_min": int(np.min(top)),
                                        "max_err_over_bound": ratio,
                                        "max_err_over_max_tau": float(err.max() / np.abs(ref).max())}
        r = out["precisions"][precision]
        print(f"  {precision:9s}  {r['bytes_per_item']:>10,}  {r['spearman_mean']:.6f} ({r['spearman_min']:.6f})  "
              f"  {r['top10_mean']:.2f} ({r['top10_min']})          {ratio:.3f}              "
              f"{r['max_err_over_max_tau']:.2e}")
        shutil.rmtree(folder, ignore_errors=True)
    # the approximate search's coarse stage on real rows: the sketch folded to k_c against the full k
    folded = idx.scores(psi, k=k_c)
    rho = [spearman(folded[:, c], ref[:, c]) for c in range(ref.shape[1])]
    out["folded"] = {"k_c": k_c, "spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
                     "recall10_in_top": {}}
    for c_top in (10, 20, 40):
        hits = [len(set(np.argsort(-ref[:, c])[:10]) & set(np.argsort(-folded[:, c])[:c_top])) / 10
                for c in range(ref.shape[1])]
        out["folded"]["recall10_in_top"][c_top] = {"mean": float(np.mean(hits)), "min": float(np.min(hits))}
    f = out["folded"]
    print(f"  folded to k_c = {k_c} (the approximate search's coarse stage) against k = {idx.k}: Spearman "
          f"{f['spearman_mean']:.3f} ({f['spearman_min']:.3f}); the full top 10 within the folded top C, mean (min): "
          + ", ".join(f"C = {c}: {v['mean']:.3f} ({v['min']:.1f})" for c, v in f["recall10_in_top"].items()))
    return out


# ---------------------------------------------------------------- 2. synthetic scale
def synthetic_blocks(n: int, k: int, rows: int, seed: int, clock: list):
    """Blocks (phi [b, k] float32,) of the synthetic model (module doc); generation time added to clock[0]."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    w = torch.from_numpy(rng.standard_normal((RANK, k), dtype=np.float32))
    pool = torch.from_numpy(rng.standard_normal((512, k), dtype=np.float32))
    a = float(np.sqrt(SIGNAL * k / (RANK * 3.0)))   # Var(t_3) = 3: the rank part's expected energy SIGNAL k
    b = float(np.sqrt(1 - SIGNAL))
    clock[0] += time.perf_counter() - t0
    for start in range(0, n, rows):
        t0 = time.perf_counter()
        m = min(rows, n - start)
        c = torch.from_numpy(rng.standard_t(3, (m, RANK)).astype(np.float32)) * a / np.sqrt(k)
        phi = c @ w
        phi.add_(pool[torch.from_numpy(rng.integers(0, len(pool), m))], alpha=b)
        phi.mul_(torch.from_numpy(np.exp(rng.normal(0, LOGNORM_SD, (m, 1))).astype(np.float32)) * 1e-3)
        clock[0] += time.perf_counter() - t0
        yield (phi,)


def queries(k: int, q: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((RANK, k), dtype=np.float32)  # the same W as the rows' (same seed, same first draw)
    d = rng.standard_normal((RANK, q)).astype(np.float32)
    return torch.from_numpy(w.T @ d / np.sqrt(RANK) + rng.standard_normal((k, q), dtype=np.float32))


def drop_cache(folder: Path) -> None:
    """Evict our own shards from the page cache (written back first), so the next pass reads from disk."""
    for path in (folder / "shards").glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def one_n(n: int, k: int, precision: str, work: Path, q: int, seed: int, approx: bool, k_c: int,
          faiss: bool = True) -> dict:
    from musicattr.attribution.index_search import ApproximateSearch, exact_top, recall

    folder = work / f"n{n}-k{k}-{precision}"
    shutil.rmtree(folder, ignore_errors=True)
    rows = max(256, (1 << 26) // (4 * k))  # 64 MiB float32 per generated block = one shard
    clock = [0.0]
    r = {"n": n, "k": k, "precision": precision, "bytes": n * bytes_per_item(k, precision)}
    with Peak() as p:
        write_index(folder, synthetic_blocks(n, k, rows, seed, clock), k, precision, rows_per_shard=rows)
        os.sync()
    r.update(generate_s=clock[0], write_s=p.seconds - clock[0], write_items_per_s=n / (p.seconds - clock[0]),
             write_mb_per_s=r["bytes"] / 1e6 / (p.seconds - clock[0]), write_peak_rss=p.peak,
             disk_bytes=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
    index = AttributionIndex(folder)
    psi = queries(k, q, seed)
    drop_cache(folder)
    with Peak() as p:
        pos, tau = index.top(psi, 10)
    r.update(exact_s=p.seconds, exact_peak_rss=p.peak, exact_base_rss=p.base, exact_read_gb_per_s=r["disk_bytes"] / 1e9 / p.seconds)
    if faiss:
        with Peak() as p:
            fpos, ftau = exact_top(index, psi.numpy(), 10)
        r.update(faiss_exact_s=p.seconds, faiss_exact_peak_rss=p.peak, faiss_equal=bool((fpos == pos).all()),
                 faiss_max_rel_diff=float(np.abs(ftau - tau).max() / np.abs(tau).max()))
    else:
        r.update(faiss_exact_s=float("nan"), faiss_exact_peak_rss=float("nan"), faiss_equal=None)
    if approx:
        sweep = []
        for coarse in ("flat", "ivf"):  # one coarse index in memory at a time
            nlist = 1 if coarse == "flat" else int(np.clip(round(np.sqrt(n)), 16, 4096))
            with Peak() as p:
                ann = ApproximateSearch(index, k_c=k_c, nlist=nlist, seed=seed)
            r.update({f"{coarse}_build_s": p.seconds, f"{coarse}_build_peak_rss": p.peak,
                      f"{coarse}_base_rss": p.base, f"{coarse}_nlist": nlist})
            for kind, nprobe, cands in SWEEP:
                if kind != coarse:
                    continue
                ann.release()  # unmap the rows read so far: mapped pages would survive drop_cache
                drop_cache(folder)
                with Peak() as p:
                    apos, _ = ann.top(psi.numpy(), 10, candidates=cands, nprobe=nprobe)
                sweep.append({"coarse": kind, "nprobe": nprobe, "candidates": cands, "query_s": p.seconds / q,
                              "peak_rss": p.peak, "recall10": recall(apos, pos)})
            del ann
        head = sweep[0]
        r.update(approx_build_s=r["flat_build_s"], approx_build_peak_rss=r["flat_build_peak_rss"],
                 approx_base_rss=r["flat_base_rss"], approx_nlist=1, approx_k_c=k_c, approx_query_s=head["query_s"],
                 approx_query_peak_rss=head["peak_rss"], approx_recall10=head["recall10"],
                 approx_candidates=head["candidates"], approx_nprobe=head["nprobe"], approx_sweep=sweep)
    del index
    shutil.rmtree(folder, ignore_errors=True)
    return r


def fit(ns, ys) -> float:
    """The exponent b of y ~ N^b (least squares in log-log)."""
    return float(np.polyfit(np.log(ns), np.log(ys), 1)[0]) if len(ns) > 1 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=float, nargs="*", default=[1e4, 1e5, 1e6], help="none: the fidelity part only")
    ap.add_argument("--precision", default="int8", choices=list(PRECISIONS))
    ap.add_argument("--precisions_at", type=float, default=1e4, help="N at which every precision is written too")
    ap.add_argument("--max_gb", type=float, default=28.0, help="the most the shards of one N may take on disk")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--k_c", type=int, default=256, help="the folded sketch size of the approximate search")
    ap.add_argument("--work", default="runs/index_scale")
    ap.add_argument("--out", default="runs/bench/index_scale.json")
    ap.add_argument("--fidelity_index", default="runs/demo/benchmark/index")
    ap.add_argument("--checkpoint", default="assets/bank/demo/model.ckpt")
    ap.add_argument("--fisher", default="runs/demo/benchmark/fisher.safetensors")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--unlearned", default="runs/demo/benchmark/compare/queries/*/unlearned.safetensors")
    ap.add_argument("--skip_fidelity", action="store_true")
    ap.add_argument("--skip_faiss", action="store_true", help="no faiss exact search (its time is the streamed one's)")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if not a.skip_fidelity:
        result["fidelity"] = fidelity(a.fidelity_index, a.checkpoint, a.fisher, a.store, a.unlearned, work, a.k_c)
        import gc

        gc.collect()

    ks = {c: int(yaml.safe_load(Path(f"configs/{c}/index.yaml").read_text())["model"]["k"]) for c in ("demo", "paper")}
    print(f"\n[scale] k: demo {ks['demo']:,}, paper {ks['paper']:,}"
          + (" (the same: one run)" if ks["demo"] == ks["paper"] else ""))
    free = shutil.disk_usage(work).free
    runs, skipped = [], []
    for k in sorted(set(ks.values())):
        per = bytes_per_item(k, a.precision)
        cap = int(min(a.max_gb * 1e9, 0.9 * free) // per // 10_000 * 10_000)
        done = set()
        for n in sorted(int(x) for x in a.ns):
            m = n if n <= cap else cap
            if m != n:
                skipped.append({"n": n, "k": k, "bytes": n * per, "cap_bytes": a.max_gb * 1e9, "run_instead": m})
                print(f"  N = {n:,} x k = {k:,} at {a.precision}: {n:,} x {per:,} B = {n * per / 1e9:.1f} GB > "
                      f"--max_gb {a.max_gb:g} GB -> the largest N that fits: {m:,} ({m * per / 1e9:.1f} GB)")
            if m in done or m <= 0:
                continue
            done.add(m)
            precisions = list(PRECISIONS) if m == int(a.precisions_at) else [a.precision]
            for precision in precisions:
                print(f"  N = {m:,}, k = {k:,}, {precision}: writing {m * bytes_per_item(k, precision) / 1e9:.2f} GB "
                      f"... ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
                r = one_n(m, k, precision, work, a.queries, 0, precision == a.precision, a.k_c, not a.skip_faiss)
                runs.append(r)
                print(f"    write {r['write_s']:.1f} s ({r['write_items_per_s']:,.0f} items/s, "
                      f"{r['write_mb_per_s']:.0f} MB/s; generation apart {r['generate_s']:.1f} s), "
                      f"exact top-10 of {a.queries} queries from disk {r['exact_s']:.2f} s "
                      f"({r['exact_read_gb_per_s']:.2f} GB/s, peak RSS {r['exact_peak_rss'] / 1e9:.2f} GB), "
                      f"faiss exact {r['faiss_exact_s']:.2f} s (equal: {r['faiss_equal']})"
                      + (f", approx (flat scan over the folded rows) build {r['approx_build_s']:.1f} s (peak "
                         f"{r['approx_build_peak_rss'] / 1e9:.2f} GB), {r['approx_query_s']:.3f} s per query (peak "
                         f"{r['approx_query_peak_rss'] / 1e9:.2f} GB), recall@10 {r['approx_recall10']:.3f}"
                         if "approx_query_s" in r else ""), flush=True)
                for w in r.get("approx_sweep", [])[1:]:
                    how = "flat scan" if w["coarse"] == "flat" else f"IVF, {w['nprobe']} of {r['ivf_nlist']} lists"
                    print(f"      approx, {how}, {w['candidates']} candidates: {w['query_s']:.3f} s per query "
                          f"(peak {w['peak_rss'] / 1e9:.2f} GB), recall@10 {w['recall10']:.3f}", flush=True)
    result.update(runs=runs, skipped=skipped, ks=ks, precision=a.precision, synthetic={
        "rank": RANK, "signal_energy": SIGNAL, "row_lognorm_sd": LOGNORM_SD})

    print("\n[growth] at", a.precision, "(time ~ N^b fitted over the measured N; RSS = peak resident set)")
    growth = {}
    for k in sorted(set(ks.values())):
        rs = [r for r in runs if r["k"] == k and r["precision"] == a.precision]
        if not rs:
            continue
        ns = np.array([r["n"] for r in rs], dtype=float)
        print(f"  k = {k:,}")
        print("    N          disk GB   write s   exact query s   exact RSS GB (base)   faiss s   approx build s   "
              "approx query s   approx RSS GB (base)   recall@10")
        for r in rs:
            print(f"    {r['n']:<10,} {r['disk_bytes'] / 1e9:7.2f}  {r['write_s']:8.1f}  {r['exact_s']:13.2f}  "
                  f"{r['exact_peak_rss'] / 1e9:13.2f} ({r['exact_base_rss'] / 1e9:.2f})  {r['faiss_exact_s']:8.2f}  "
                  f"{r['approx_build_s']:15.1f}  {r['approx_query_s']:15.3f}  "
                  f"{r['approx_query_peak_rss'] / 1e9:14.2f} ({r['approx_base_rss'] / 1e9:.2f})  "
                  f"{r['approx_recall10']:9.3f}")
        g = {}
        for key in ("write_s", "exact_s", "exact_peak_rss", "faiss_exact_s", "approx_build_s", "approx_query_s",
                    "approx_build_peak_rss", "approx_query_peak_rss"):
            ys = np.array([r[key] for r in rs], dtype=float)
            b = fit(ns, ys)
            at = float(ys[-1] * (1e6 / ns[-1]) ** b) if len(ns) else float("nan")
            g[key] = {"exponent": b, "at_1e6": at, "measured_up_to": int(ns[-1])}
        growth[k] = g
        print("    fitted exponents b (y ~ N^b): " + ", ".join(f"{key} {v['exponent']:.2f}" for key, v in g.items()))
        last = rs[-1]
        if last["n"] < 1_000_000:
            n6, per = 1_000_000, bytes_per_item(k, a.precision)
            print(f"    10^6 not run at k = {k:,}: its shards take 10^6 x {per:,} B = {n6 * per / 1e9:.1f} GB "
                  f"({a.precision}; float16 {n6 * bytes_per_item(k, 'float16') / 1e9:.1f} GB, float32 "
                  f"{n6 * bytes_per_item(k, 'float32') / 1e9:.1f} GB) > {a.max_gb:g} GB. Extrapolated from N = "
                  f"{last['n']:,} with the fitted exponents:")
            for key in ("write_s", "exact_s", "exact_peak_rss", "approx_query_s", "approx_query_peak_rss"):
                v = g[key]
                unit = "GB" if "rss" in key else "s"
                val = v["at_1e6"] / 1e9 if "rss" in key else v["at_1e6"]
                lastv = last[key] / 1e9 if "rss" in key else last[key]
                print(f"      {key}: {lastv:.3g} {unit} x (10^6 / {last['n']:,})^{v['exponent']:.2f} = {val:.3g} {unit}")
            read = last["exact_read_gb_per_s"]
            print(f"    an exact query at 10^6 reads {n6 * per / 1e9:.1f} GB: at the measured {read:.2f} GB/s (one "
                  f"thread, read + decode + product) that is {n6 * per / 1e9 / read:.0f} s; under 5 s needs "
                  f"{n6 * per / 1e9 / 5:.1f} GB/s")
    result["growth"] = {str(k): v for k, v in growth.items()}
    result["seconds"] = time.perf_counter() - t_start
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {a.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

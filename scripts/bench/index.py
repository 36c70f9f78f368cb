"""Section 6: the attribution index against exact scoring, as ratios measured in one run.

Per item, on the same items, draws and device: one exact ``attribute`` pass (``ScoringModule.predict_step``,
baseline cached: what every query pays) vs the index build (``IndexModule.predict_step``: one forward and
backward per item, the sketch). A query: its gradient (``QueryContext.from_query``: K draws) plus the lookup
(``AttributionIndex.scores``) on synthetic indexes of N and 4N rows; or psi from an unlearned file (read, no
gradient) plus the lookup. The ratios are for the whole store:
exact pass = N x (seconds per item), build = N x (seconds per item), query = gradient + lookup(N).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import log, summary
from musicattr.models.throughput import timed

BUILD_TARGET, QUERY_TARGET = 3.0, 0.01  # build <= 3 exact passes, a query <= 1% of one


def _to(batch: dict, device: str) -> dict:
    import torch

    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def synthetic_index(root: Path, rows: int, k: int, shard_rows: int = 512, seed: int = 0) -> Path:
    """An index folder of ``rows`` random rows (the layout of ``musicattr index``), for lookup timing."""
    import numpy as np
    import pandas as pd
    import torch

    from musicattr.attribution.index import INDEX_FILE, ITEMS_FILE, SHARDS
    from musicattr.parts import TensorFormat

    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    frames = []
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        idx = list(range(start, start + n))
        path = TensorFormat("cat").write(root / SHARDS, 0, {"index": idx, "tensors": {
            "phi": [torch.randn(n, k, generator=g)], "sensitivity": [torch.rand(n, generator=g, dtype=torch.float64)],
            "baseline_loss": [torch.rand(n, generator=g, dtype=torch.float64)]}})
        frames.append(pd.DataFrame({"index": idx, "item_id": [f"synthetic/{i}" for i in idx],
                                    "shard": f"{SHARDS}/{path.name}", "row": np.arange(n),
                                    "sensitivity": 1.0, "baseline_loss": 1.0}))
    pd.concat(frames).to_parquet(root / ITEMS_FILE, index=False)
    (root / INDEX_FILE).write_text(json.dumps({"provenance": {"projection": "sketch", "synthetic": True},
                                               "num_items": rows, "k": k, "shards": []}))
    return root


def bench_lookup(work: Path, rows: int, k: int, queries: int, repeats: int) -> dict:
    """Seconds of ``AttributionIndex.scores`` for ``queries`` query vectors over ``rows`` synthetic rows."""
    import torch

    from musicattr.attribution.index import AttributionIndex

    folder = work / f"lookup-{rows}"
    index = AttributionIndex(folder if folder.exists() else synthetic_index(folder, rows, k))
    psi = torch.randn(k, queries, dtype=torch.float64)
    index.scores(psi)  # warm-up (page cache)
    times = timed(lambda: index.scores(psi), "cpu", repeats)
    size = sum(p.stat().st_size for p in (index.root / "shards").glob("part-*"))
    return {"rows": rows, "k": k, "queries": queries, "bytes_per_item": size / rows, **summary(times)}


def bench_index(checkpoint: str, fisher: str, unlearned: str, work: Path, batches: list[dict], batches4: list[dict],
                draws: int, k: int, query: dict, query_draws: int, store_items: int, repeats: int,
                device: str = "cpu", lookup_rows: int = 4096) -> dict:
    """The figures of section 6 (see the module docstring); ``batches4`` hold 4x the items of ``batches``."""
    import torch

    from musicattr.attribution.index import IndexModule
    from musicattr.attribution.query import gradient_psi, project, unlearned_psi
    from musicattr.attribution.score import ScoringModule

    n, n4 = (sum(len(b["item_id"]) for b in bs) for bs in (batches, batches4))
    batches, batches4 = [_to(b, device) for b in batches], [_to(b, device) for b in batches4]
    # the exact pass: theta_unlearned's loss, baseline cached (warm-up fills the cache)
    exact = ScoringModule(checkpoint, unlearned, str(work / "exact"), num_draws=draws, draws_per_forward=16,
                          use_baseline_cache=False)
    exact.eval()
    exact.prepare(device)
    exact.baseline_cache = {i: x for b in batches for o in [exact.predict_step(b, 0)]
                            for i, x in zip(o["index"], o["baseline_draws"])}  # theta0's T draws per item
    t_exact = timed(lambda: [exact.predict_step(b, 0) for b in batches], device, repeats)
    del exact
    # the build: per-item gradient (forward + backward) and sketch, at n and 4n items
    build = IndexModule(checkpoint, fisher, str(work / "index"), num_draws=draws, k=k,
                        draws_per_forward=max(draws, 1)).to(device)
    build.on_predict_start()
    build.predict_step(batches[0], 0)  # warm-up
    t_build = timed(lambda: [build.predict_step(b, 0) for b in batches], device, repeats)
    t_build4 = timed(lambda: [build.predict_step(b, 0) for b in batches4], device, 1)
    # a query: psi from its gradient (K draws) and its sketch
    params, precond = build.params, build.precond
    q = _to(query, device)

    def gradient():
        psi = gradient_psi(build.task, build.theta0, params, precond, q, 1e-6, store_items, query_draws, 0, True, 16)
        project(build.projection, psi)

    t_grad = timed(gradient, device, max(1, repeats - 1))

    def from_unlearned():  # psi = (F + lambda)^1/2 (theta_u - theta0): read the file, no gradient
        from musicattr.attribution.unlearn import load_unlearned

        project(build.projection, unlearned_psi(params, load_unlearned(unlearned)[0], precond))

    t_unl = timed(from_unlearned, device, repeats)
    lookups = {f"{rows}": bench_lookup(work, rows, k, 1, repeats)
               for rows in dict.fromkeys((store_items, 4 * store_items, lookup_rows, 4 * lookup_rows))}
    many = bench_lookup(work, store_items, k, 16, repeats)
    per_item_exact = statistics.median(t_exact) / n
    per_item_build = statistics.median(t_build) / n
    exact_pass = per_item_exact * store_items
    lookup = lookups[f"{store_items}"]["median_s"]
    query_s = statistics.median(t_grad) + lookup
    res = {"device": device, "items": n, "draws": draws, "k": k, "query_draws": query_draws,
           "store_items": store_items,
           "exact_per_item_s": per_item_exact, "exact": summary(t_exact),
           "build_per_item_s": per_item_build, "build": summary(t_build),
           "build_4n": {"items": n4, **summary(t_build4), "per_item_s": t_build4[0] / n4},
           "query_gradient": summary(t_grad), "query_from_unlearned": summary(t_unl), "lookup": lookups,
           "lookup_16_queries": many,
           "exact_pass_s": exact_pass, "build_s": per_item_build * store_items, "query_s": query_s,
           "ratio_build_over_exact": per_item_build / per_item_exact,
           "ratio_query_over_exact": query_s / exact_pass, "ratio_lookup_over_exact": lookup / exact_pass,
           "ratio_query_over_unlearn_and_exact": query_s / (statistics.median(t_grad) + exact_pass),
           "ratio_unlearned_query_over_exact": (statistics.median(t_unl) + lookup) / exact_pass,
           "bytes_per_item": lookups[f"{store_items}"]["bytes_per_item"],
           "targets": {"build_over_exact": BUILD_TARGET, "query_over_exact": QUERY_TARGET}}
    log(f"  exact pass (baseline cached): {per_item_exact * 1e3:.1f} ms per item -> {exact_pass:.1f} s for the "
        f"store's {store_items} items")
    log(f"  build: {per_item_build * 1e3:.1f} ms per item at {n} items, {res['build_4n']['per_item_s'] * 1e3:.1f} ms "
        f"at {n4} (x{t_build4[0] / statistics.median(t_build):.2f} time for x{n4 / n:.0f} items) -> "
        f"{res['ratio_build_over_exact']:.2f} exact passes (target <= {BUILD_TARGET})")
    log(f"  query: gradient {statistics.median(t_grad):.3f} s (K={query_draws}) + lookup {lookup * 1e3:.2f} ms "
        f"({store_items} rows), {lookups[f'{4 * store_items}']['median_s'] * 1e3:.2f} ms ({4 * store_items} rows), "
        f"{lookups[f'{lookup_rows}']['median_s'] * 1e3:.1f} ms ({lookup_rows}), "
        f"{lookups[f'{4 * lookup_rows}']['median_s'] * 1e3:.1f} ms ({4 * lookup_rows}); 16 queries in one pass "
        f"over {store_items} rows {many['median_s'] * 1e3:.2f} ms")
    log(f"  query / exact pass: {res['ratio_query_over_exact']:.2%} (target <= {QUERY_TARGET:.0%}); lookup alone "
        f"{res['ratio_lookup_over_exact']:.3%}; psi from an unlearned file instead of the gradient "
        f"({statistics.median(t_unl) * 1e3:.1f} ms): {res['ratio_unlearned_query_over_exact']:.3%}; index "
        f"{res['bytes_per_item'] / 1024:.1f} KiB per item")
    return res

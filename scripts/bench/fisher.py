"""Section 4: Fisher throughput, vmap(grad) vs the per-sample loop, on one batch (``musicattr.attribution.fisher``)."""
from __future__ import annotations

import statistics

from bench.common import log, summary, timed


def bench_fisher(task, model, batch, draws: int, warmup: int, repeats: int, chunk_size: int) -> tuple[dict, dict]:
    """``task``: an AttributionTask, ``model`` its theta; the Fisher's target group 'all', draws keyed fisher/<id>."""
    from musicattr.attribution.fisher import squared_grads_loop, squared_grads_vmap
    from musicattr.data.datamodules import item_slice

    params = task.select_parameters(model, "all")
    args = (task, model, params, batch, 0, range(draws))
    n = len(batch["item_id"]) * draws
    # warm-up on one item (cheaper than the whole batch; CPU kernels need no compilation)
    one = (task, model, params, item_slice(batch, 0), 0, range(min(draws, 2)))
    res = {}
    sq_vmap = sq_loop = None
    for name, fn, warm in (("vmap", lambda: squared_grads_vmap(*args, chunk_size=chunk_size),
                            lambda: squared_grads_vmap(*one, chunk_size=chunk_size)),
                           ("loop", lambda: squared_grads_loop(*args), lambda: squared_grads_loop(*one))):
        holder = {}

        def run():
            holder["sq"] = fn()

        for _ in range(warmup):
            warm()
        times = timed(run, 0, repeats)
        res[name] = {"item_timesteps": n, "item_timesteps_per_s": n / statistics.median(times), **summary(times)}
        if name == "vmap":
            sq_vmap = holder["sq"]
        else:
            sq_loop = holder["sq"]
        log(f"  fisher {name:<5}: {res[name]['item_timesteps_per_s']:8.1f} item-timesteps/s "
            f"({n} per run, median {statistics.median(times):.3f} s)")
    rel = max(float((sq_vmap[k] - sq_loop[k]).abs().max() / sq_loop[k].abs().max().clamp_min(1e-30))
              for k in sq_loop)
    res["ratio_vmap_over_loop"] = res["vmap"]["item_timesteps_per_s"] / res["loop"]["item_timesteps_per_s"]
    res["max_rel_diff_vmap_vs_loop"] = rel
    res.update({"items": len(batch["item_id"]), "draws": draws, "chunk_size": chunk_size,
                "parameters": sum(p.numel() for p in params.values())})
    log(f"  fisher vmap/loop ratio: {res['ratio_vmap_over_loop']:.2f}x  (max rel. diff of the sums {rel:.1e})")
    fisher = {k: (v / n).float() for k, v in sq_vmap.items()}
    return res, fisher

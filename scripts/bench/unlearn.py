"""Section 5: one unlearning step (Eq. 2): ``unlearn_query`` = ``loss_gradient`` (the query gradient) +
``eq2_update``."""
from __future__ import annotations

import statistics
import time

from bench.common import log, summary, timed


def bench_unlearn(checkpoint: str, query: dict, fisher: dict, num_items: int, num_draws: int, warmup: int,
                  repeats: int, draws_per_forward: int) -> tuple[dict, dict]:
    import torch

    from musicattr.attribution.loss import UNLEARN
    from musicattr.attribution.preconditioner import DiagonalFisher
    from musicattr.attribution.task import load_theta
    from musicattr.attribution.unlearn import eq2_update, loss_gradient, unlearn_query

    task, model = load_theta(None, checkpoint)
    params = task.select_parameters(model, "all")
    precond = DiagonalFisher(fisher, params, 1e-3)
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    holder = {}

    def step():  # the "mixed" strategy: M_U on
        holder["new"] = unlearn_query(task, model, query, precond, num_items, "all", lr=1e-3, steps=1,
                                      num_draws=num_draws, seed=0, mask=True, draws_per_forward=draws_per_forward)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta0[k])

    for _ in range(warmup):  # warm-up with one chunk of draws, then time the full K
        unlearn_query(task, model, query, precond, num_items, "all", lr=1e-3, steps=1,
                      num_draws=min(num_draws, draws_per_forward), seed=0, mask=True,
                      draws_per_forward=draws_per_forward)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta0[k])
    times = timed(step, 0, repeats)
    # the split: gradient vs Eq. 2 update (one run each, after the warm-up above)
    t0 = time.perf_counter()
    g = loss_gradient(task, model, params, query, 0, num_draws, namespace=UNLEARN, mask=True,
                      draws_per_forward=draws_per_forward)
    t1 = time.perf_counter()
    eq2_update({k: p.detach() for k, p in params.items()}, g, precond, 1e-3, num_items)
    t2 = time.perf_counter()
    med = statistics.median(times)
    res = {"num_draws": num_draws, "draws_per_forward": draws_per_forward, "target": "all",
           "parameters": sum(p.numel() for p in params.values()), "step_s_per_100_timesteps": med * 100 / num_draws,
           "query_gradient_s": t1 - t0, "eq2_update_s": t2 - t1, **summary(times)}
    log(f"  unlearn step: {res['step_s_per_100_timesteps']:.3f} s per 100 query timesteps "
        f"(K={num_draws}: median {med:.3f} s; gradient {t1 - t0:.3f} s + Eq. 2 update {t2 - t1:.4f} s)")
    return res, holder["new"]

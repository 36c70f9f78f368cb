"""Section 2 (first half) and the DDP capacity check: square-matmul FLOP/s of this machine."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import fmt_flops, log, summary, timed


def bench_matmul(sizes: list[int], dtypes: list[str], seconds: float, repeats: int) -> dict:
    """Square-matmul FLOP/s (2 n^3 per product) with the current torch threads; median of repeats."""
    import torch

    out = {}
    for dt in dtypes:
        dtype = getattr(torch, dt)
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            c = torch.empty(n, n, dtype=dtype)
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)  # warm-up, and a first estimate of the loop length
            one = max(time.perf_counter() - t0, 1e-6)
            iters = max(2, int(seconds / one))

            def loop():
                for _ in range(iters):
                    torch.mm(a, b, out=c)

            times = timed(loop, 1 if one < 0.5 else 0, repeats)
            flops = 2.0 * n ** 3 * iters / statistics.median(times)
            out[f"{dt}_{n}"] = {"dtype": dt, "n": n, "iters": iters, "flops_per_s": flops, **summary(times)}
            log(f"  matmul {dt:<8} {n:>5} x {n:<5}: {fmt_flops(flops)}")
    return out


CAPACITY_CHILD = r"""
import json, os, sys, time, torch
torch.set_num_threads(1)
d, i, k, n, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
a, b = torch.randn(n, n), torch.randn(n, n)
torch.mm(a, b)
open(os.path.join(d, "ready." + i), "w").close()
while len([f for f in os.listdir(d) if f.startswith("ready.")]) < k:
    time.sleep(0.005)
t0 = time.time()
for _ in range(iters):
    torch.mm(a, b)
print(json.dumps({"start": t0, "end": time.time()}))
"""


def parallel_capacity(work: Path, iters: int, n: int = 1024) -> dict:
    """Aggregate 1-thread float32 matmul FLOP/s of 1 vs 2 concurrent processes (barrier-synchronised):
    how much of a 2x the machine can give two processes right now (bounds the DDP speedup)."""
    res = {}
    for k in (1, 2):
        d = work / f"capacity-{k}"
        d.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        ps = [subprocess.Popen([sys.executable, "-c", CAPACITY_CHILD, str(d), str(i), str(k), str(n), str(iters)],
                               stdout=subprocess.PIPE, text=True, env=env) for i in range(k)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
        span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
        res[str(k)] = {"procs": k, "span_s": span, "flops_per_s": k * iters * 2.0 * n ** 3 / span}
    res["speedup"] = res["2"]["flops_per_s"] / res["1"]["flops_per_s"]
    log(f"  machine capacity now: 2 concurrent 1-thread matmul processes reach {res['speedup']:.2f}x the throughput "
        f"of one ({fmt_flops(res['1']['flops_per_s'])} -> {fmt_flops(res['2']['flops_per_s'])})")
    return res

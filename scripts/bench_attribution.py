#!/usr/bin/env python
"""Attribution benchmark: prints figures and writes them (with the machine) to a JSON file.

    .venv/bin/python scripts/bench_attribution.py --checkpoint runs/demo/fit/last.ckpt \
        --store runs/demo/store --fisher runs/demo/fisher.safetensors --out runs/bench/attribution.json
    .venv/bin/python scripts/bench_attribution.py --synthetic --quick      # no demo run needed

A benchmark, not a test: it always exits 0 once it has measured (``--strict`` makes a missed
target exit 1). What it measures, on the DiT of ``--checkpoint`` and the first ``--items`` items
of ``--store`` with ``--draws`` (t, eps) draws per item:

1. scoring throughput, item-timesteps/s = items x draws / seconds, of ``ScoringModule.predict_step``
   (``item_loss`` under no_grad, batches of ``--batch-size`` items): (a) with the baseline losses
   L(z, theta0) cached (one pass, theta_unlearned) vs (b) recomputing them (two passes). Target a/b >= 1.8.
2. achieved FLOP/s of the scoring forward (FLOPs of one batch's ``item_loss`` counted with
   ``torch.utils.flop_counter.FlopCounterMode``, divided by its median time) vs the measured
   float32 / bfloat16 square-matmul FLOP/s of this machine with the same threads.
3. 1 vs 2 CPU DDP processes (gloo, OMP_NUM_THREADS=1 each) running the real ``musicattr attribute``
   stage as subprocesses on a store view holding the first ``--items`` items, baseline cache off.
   Method: a Lightning callback of this file (``PredictLoopTimer``, added with
   ``--trainer.callbacks+=``) records on every rank the wall-clock time of on_predict_start and
   on_predict_end; the prediction time is max(end) - min(start) over ranks, i.e. the scoring loop
   only (data loading, forward passes, part writing), without interpreter start-up, imports,
   checkpoint loading, DDP set-up or the final merge. The subprocess's total wall time is reported
   too. Target speedup >= 1.6.
4. Fisher throughput (item-timesteps/s): ``squared_grads_vmap`` vs ``squared_grads_loop`` on the same batch.
5. one unlearning step (``unlearn_query``: ``query_gradient`` + ``eq2_update``, steps=1) with
   ``--unlearn-draws`` query timesteps (>= 100), reported per 100 query timesteps.

Every figure is the median of ``--repeats`` timed runs after warm-up. The numbers depend on the
load of the machine: the load average at start and end is written with them.

``--synthetic`` builds (under ``<out dir>/synthetic/``) a latent store of random latents and a
randomly initialised checkpoint of the demo model config (configs/demo/fit.yaml); the Fisher is then
the one measured in section 4. Everything in the output is labelled synthetic.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
CACHE_TARGET = 1.8
DDP_TARGET = 1.6

try:  # the timer is imported by the `musicattr attribute` subprocesses (section 3)
    import lightning as _L

    class PredictLoopTimer(_L.Callback):
        """Writes this rank's wall-clock times of the prediction loop to ``<out>.r<rank>.json``."""

        def __init__(self, out: str):
            self.out = out
            self.items = 0
            self.batches = 0

        def on_predict_start(self, trainer, pl_module):
            self.start = time.time()

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.items += len(batch["index"])
            self.batches += 1

        def on_predict_end(self, trainer, pl_module):
            end = time.time()
            Path(f"{self.out}.r{trainer.global_rank}.json").write_text(json.dumps(
                {"rank": trainer.global_rank, "world": trainer.world_size, "start": self.start, "end": end,
                 "items": self.items, "batches": self.batches, "threads": __import__("torch").get_num_threads()}))
except ImportError:  # pragma: no cover
    pass


# ----------------------------------------------------------------------------------------------- helpers
def log(msg: str = "") -> None:
    print(msg, flush=True)


def timed(fn, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def fmt_flops(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP/s"


def loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine_info(threads: int) -> dict:
    import lightning
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads, "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
        "avx512_bf16": " avx512_bf16" in flags, "amx_bf16": " amx_bf16" in flags,
        "loadavg_start": loadavg(),
    }


# ----------------------------------------------------------------------------------------------- inputs
def demo_model_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs/demo/fit.yaml").read_text())["model"]["model_config"]


def build_synthetic(root: Path, n_items: int, seed: int = 0) -> tuple[str, str]:
    """A random latent store of ``n_items`` items and a random-init checkpoint of the demo DiT config."""
    import numpy as np
    import torch

    from musicattr.data.latent_store import LatentStoreWriter
    from musicattr.models.diffusion_module import DiffusionModule

    cfg = demo_model_config()
    channels = int(cfg["model"]["io_channels"])
    frames = int(cfg["sample_size"]) // 2048
    text_dim = int(cfg["model"]["conditioning"]["cond_dim"])
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    g = np.random.default_rng(seed)
    w = LatentStoreWriter(root / "store", {"format": 1, "latent_channels": channels, "max_frames": frames,
                                           "sample_rate": int(cfg["sample_rate"]), "audio_channels": 1,
                                           "downsampling_ratio": 2048, "text_encoder": "synthetic",
                                           "text_dim": text_dim})
    shard = 64
    for start in range(0, n_items, shard):
        idx = list(range(start, min(n_items, start + shard)))
        lat = g.standard_normal((len(idx), channels, frames)).astype(np.float32)
        valid = [int(g.integers(frames // 4, frames + 1)) for _ in idx]
        for j, v in enumerate(valid):
            lat[j, :, v:] = 0.0
        text = g.standard_normal((len(idx), 1, text_dim)).astype(np.float32)
        items = [{"index": i, "item_id": f"synthetic/track{i:05d}.wav", "caption": f"synthetic caption {i}",
                  "file_name": f"synthetic/track{i:05d}.wav", "valid_frames": v, "seconds_start": 0,
                  "seconds_total": int(np.ceil(v * 2048 / int(cfg["sample_rate"]))),
                  "duration_s": v * 2048 / int(cfg["sample_rate"])} for i, v in zip(idx, valid)]
        w.write_shard(f"r0-{start:09d}", lat, text, items)
    w.finalize(expected=n_items)
    torch.manual_seed(seed)
    module = DiffusionModule(cfg)
    with torch.no_grad():  # SAT zero-inits some layers: make every weight non-zero (as tests/conftest.py)
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = root / "theta0-random-init.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    return str(ckpt), str(root / "store")


def store_view(src: str, dst: Path, n_items: int) -> str:
    """A store directory showing the first ``n_items`` items of ``src`` (shards symlinked, not copied)."""
    import pandas as pd

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(src) / "manifest.json", dst / "manifest.json")
    (dst / "shards").symlink_to(Path(src).resolve() / "shards")
    df = pd.read_parquet(Path(src) / "index.parquet")
    df.head(n_items).to_parquet(dst / "index.parquet", index=False)
    return str(dst)


def missing_inputs_message(checkpoint: str, store: str) -> str:
    lines = ["bench_attribution: missing inputs:"]
    if not Path(checkpoint).exists():
        lines.append(f"  checkpoint {checkpoint} not found")
    if not (Path(store) / "index.parquet").exists():
        lines.append(f"  latent store {store} not found (no index.parquet)")
    lines += ["make them with the demo stages (each reruns only when needed):",
              "  make runs/demo/fit/last.ckpt runs/demo/fisher.safetensors   # corpus -> autoencoder -> encode -> "
              "fit -> fisher",
              "  (or `make demo` for the whole flow, or `make bench`, which makes them first)",
              "or pass --synthetic to benchmark a random-init DiT of configs/demo/fit.yaml on a random latent store."]
    return "\n".join(lines)


def batches_of(store, n_items: int, batch_size: int) -> list[dict]:
    from musicattr.data.datamodules import collate_items

    n = min(n_items, len(store))
    return [collate_items([store[i] for i in range(s, min(n, s + batch_size))]) for s in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------- sections
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


def bench_fisher(module, batch, draws: int, warmup: int, repeats: int, chunk_size: int) -> tuple[dict, dict]:
    import torch

    from musicattr.attribution.fisher import squared_grads_loop, squared_grads_vmap
    from musicattr.attribution.targets import select_parameters

    net = module.net
    params = select_parameters(net, "all")
    with torch.no_grad():
        cond = module.conditioning_inputs(batch)
    args = (net, params, batch["latents"], cond, batch["item_id"], 0, range(draws), None)
    n = len(batch["item_id"]) * draws
    # warm-up on one item (cheaper than the whole batch; CPU kernels need no compilation)
    one = (net, params, batch["latents"][:1], {k: (v[:1] if torch.is_tensor(v) else v) for k, v in cond.items()},
           batch["item_id"][:1], 0, range(min(draws, 2)), None)
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


def bench_unlearn(checkpoint: str, query: dict, fisher: dict, num_items: int, num_draws: int, warmup: int,
                  repeats: int, draws_per_forward: int) -> tuple[dict, dict]:
    import torch

    from musicattr.attribution.targets import select_parameters
    from musicattr.attribution.unlearn import eq2_update, query_gradient, unlearn_query
    from musicattr.models.diffusion_module import load_diffusion_module

    module = load_diffusion_module(checkpoint)
    net = module.net
    params = select_parameters(net, "all")
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        cond = module.conditioning_inputs(query)
    mask = module.frame_mask(query)  # the "mixed" strategy: M_U on
    qid = "unlearn/" + query["item_id"][0]
    holder = {}

    def step():
        holder["new"] = unlearn_query(net, query["latents"], cond, qid, fisher, num_items, "all", lr=1e-3, steps=1,
                                      num_draws=num_draws, seed=0, frame_mask=mask, damping=1e-3,
                                      draws_per_forward=draws_per_forward)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta0[k])

    for _ in range(warmup):  # warm-up with one chunk of draws, then time the full K
        unlearn_query(net, query["latents"], cond, qid, fisher, num_items, "all", lr=1e-3, steps=1,
                      num_draws=min(num_draws, draws_per_forward), seed=0, frame_mask=mask, damping=1e-3,
                      draws_per_forward=draws_per_forward)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta0[k])
    times = timed(step, 0, repeats)
    # the split: gradient vs Eq. 2 update (one run each, after the warm-up above)
    t0 = time.perf_counter()
    g = query_gradient(net, params, query["latents"], cond, qid, 0, num_draws, mask, draws_per_forward)
    t1 = time.perf_counter()
    eq2_update({k: p.detach() for k, p in params.items()}, g, fisher, 1e-3, num_items, 1e-3)
    t2 = time.perf_counter()
    med = statistics.median(times)
    res = {"num_draws": num_draws, "draws_per_forward": draws_per_forward, "target": "all",
           "parameters": sum(p.numel() for p in params.values()), "step_s_per_100_timesteps": med * 100 / num_draws,
           "query_gradient_s": t1 - t0, "eq2_update_s": t2 - t1, **summary(times)}
    log(f"  unlearn step: {res['step_s_per_100_timesteps']:.3f} s per 100 query timesteps "
        f"(K={num_draws}: median {med:.3f} s; gradient {t1 - t0:.3f} s + Eq. 2 update {t2 - t1:.4f} s)")
    return res, holder["new"]


def bench_scoring(checkpoint: str, store: str, unlearned: str, work: Path, batches: list[dict], draws: int,
                  warmup: int, repeats: int, draws_per_forward: int) -> dict:
    """ScoringModule.predict_step over ``batches``: baseline cached (a) vs recomputed (b); FLOPs of one pass."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from musicattr.attribution.score import ScoringModule

    m = ScoringModule(checkpoint, store, unlearned, str(work / "scoring-out"), num_draws=draws, seed=0,
                      batch_size=len(batches[0]["item_id"]), draws_per_forward=draws_per_forward,
                      use_baseline_cache=False)
    m.eval()
    # what ScoringModule.setup does on one CPU process, without a Trainer
    named = dict(m.theta0.net.named_parameters())
    m.params = {k: named[k] for k in m.changed}
    m.original = {k: p.detach().clone() for k, p in m.params.items()}
    m.unlearned_values = {k: v.to(m.params[k].dtype) for k, v in m.changed.items()}
    n_items = sum(len(b["item_id"]) for b in batches)
    work_items = n_items * draws

    last = {}

    def run_all():
        last["outs"] = [m.predict_step(b, i) for i, b in enumerate(batches)]

    for _ in range(warmup):  # warm-up: one batch, both passes
        m.cached_baseline = {}
        m.predict_step(batches[0], 0)
    # interleaved (b), (a), (b), (a), ... so that a drifting machine load hits both alike;
    # the first (b) run fills the baseline cache, as the first query of a real run does
    t_recompute, t_cached, cache = [], [], {}
    for _ in range(repeats):
        m.cached_baseline = {}
        t_recompute += timed(run_all, 0, 1)
        outs = last["outs"]
        cache = cache or {i: float(x) for o in outs for i, x in zip(o["index"], o["baseline_loss"])}
        m.cached_baseline = cache
        t_cached += timed(run_all, 0, 1)
    check = last["outs"]
    same = all((o["unlearned_loss"] == c["unlearned_loss"]).all() and (o["baseline_loss"] == c["baseline_loss"]).all()
               for o, c in zip(outs, check))
    a = work_items / statistics.median(t_cached)
    b = work_items / statistics.median(t_recompute)
    log(f"  (a) baseline cached    : {a:8.1f} item-timesteps/s  (median {statistics.median(t_cached):.3f} s for "
        f"{n_items} items x {draws} draws)")
    log(f"  (b) baseline recomputed: {b:8.1f} item-timesteps/s  (median {statistics.median(t_recompute):.3f} s)")
    pairwise = statistics.median(r / c for r, c in zip(t_recompute, t_cached))
    log(f"  ratio a/b: {a / b:.2f}  (target >= {CACHE_TARGET}; ideal 2.0; median of adjacent-pair ratios "
        f"{pairwise:.2f})  cached scores identical: {same}")

    # FLOPs of one scoring pass (one item_loss) on the first batch, and its median time
    b0 = batches[0]
    m._set(m.unlearned_values)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            m._loss(b0)
        flops = float(fc.get_total_flops())
        t_pass = timed(lambda: m._loss(b0), warmup, repeats)
    by_op = {}
    for mod_counts in [fc.get_flop_counts().get("Global", {})]:
        for op, c in mod_counts.items():
            by_op[str(op)] = int(c)
    achieved = flops / statistics.median(t_pass)
    n0 = len(b0["item_id"]) * draws
    log(f"  one scoring pass on {len(b0['item_id'])} items x {draws} draws: {flops / 1e9:.2f} GFLOP "
        f"({flops / n0 / 1e6:.1f} MFLOP per item-timestep), median {statistics.median(t_pass):.3f} s -> "
        f"{fmt_flops(achieved)}")
    return {"items": n_items, "draws": draws, "batch_size": len(b0["item_id"]), "batches": len(batches),
            "draws_per_forward": draws_per_forward, "item_timesteps_per_pass": work_items,
            "cached": {"item_timesteps_per_s": a, **summary(t_cached)},
            "recompute": {"item_timesteps_per_s": b, **summary(t_recompute)},
            "ratio_cached_over_recompute": a / b, "ratio_pairwise_median": pairwise, "target_ratio": CACHE_TARGET,
            "cached_scores_identical": same,
            "flops": {"flops_per_pass": flops, "flops_per_item_timestep": flops / n0, "by_op": by_op,
                      "pass_time": summary(t_pass), "achieved_flops_per_s": achieved}}


def run_attribute(procs: int, checkpoint: str, store: str, unlearned: str, work: Path, draws: int,
                  batch_size: int, draws_per_forward: int, tag: str, timeout: float) -> dict:
    """One `musicattr attribute` subprocess run (DDP over ``procs`` CPU processes); returns its timings."""
    out_dir = work / f"attr-{tag}"
    timer = work / f"timer-{tag}"
    cb = json.dumps({"class_path": "bench_attribution.PredictLoopTimer", "init_args": {"out": str(timer)}})
    cmd = [sys.executable, "-m", "musicattr.cli", "attribute", "--config", "configs/demo/attribute.yaml",
           "--model.checkpoint", checkpoint, "--model.store", store, "--model.unlearned", unlearned,
           "--model.out_dir", str(out_dir), "--model.num_draws", str(draws), "--model.batch_size", str(batch_size),
           "--model.draws_per_forward", str(draws_per_forward), "--model.use_baseline_cache", "false",
           "--model.overwrite", "true", "--model.top_k", "3", "--model.relative", "false",
           "--trainer.accelerator", "cpu", "--trainer.devices", str(procs), "--trainer.strategy", "ddp",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(work / f"root-{tag}"),
           f"--trainer.callbacks+={cb}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"`musicattr attribute` with {procs} process(es) failed (exit {p.returncode}):\n"
                           f"{' '.join(cmd)}\n--- stderr (tail) ---\n{p.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{timer}.r{r}.json").read_text()) for r in range(procs)
             if Path(f"{timer}.r{r}.json").exists()]
    res = {"procs": procs, "total_wall_s": wall, "ranks": ranks}
    if len(ranks) == procs:
        res["predict_s"] = max(r["end"] for r in ranks) - min(r["start"] for r in ranks)
        res["items"] = sum(r["items"] for r in ranks)
        res["threads_per_rank"] = [r["threads"] for r in ranks]
    for r in ranks:
        Path(f"{timer}.r{r['rank']}.json").unlink()
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


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


def bench_ddp(checkpoint: str, store: str, unlearned: str, work: Path, n_items: int, draws: int, batch_size: int,
              draws_per_forward: int, repeats: int, timeout: float, capacity_iters: int = 40) -> dict:
    view = store_view(store, work / "store-view", n_items)
    res = {"method": "PredictLoopTimer callback: max(on_predict_end) - min(on_predict_start) over ranks "
                     "(wall clock); total subprocess wall time also given",
           "items": n_items, "draws": draws, "batch_size": batch_size, "omp_num_threads": 1, "runs": {}}
    res["capacity"] = parallel_capacity(work, capacity_iters)
    for procs in (1, 2):
        runs = []
        for r in range(repeats):
            x = run_attribute(procs, checkpoint, view, unlearned, work, draws, batch_size, draws_per_forward,
                              f"p{procs}-{r}", timeout)
            runs.append(x)
            log(f"  {procs} process(es), run {r + 1}/{repeats}: prediction loop "
                f"{x.get('predict_s', float('nan')):.2f} s, whole subprocess {x['total_wall_s']:.2f} s")
        pred = [x["predict_s"] for x in runs if "predict_s" in x]
        work_items = n_items * draws * 2  # baseline recomputed: two passes per item
        res["runs"][str(procs)] = {
            "runs": runs, "predict_median_s": statistics.median(pred) if pred else None,
            "total_wall_median_s": statistics.median(x["total_wall_s"] for x in runs),
            "item_timesteps_per_s": (n_items * draws / statistics.median(pred)) if pred else None,
            "forward_item_timesteps_per_s": (work_items / statistics.median(pred)) if pred else None}
    p1, p2 = res["runs"]["1"]["predict_median_s"], res["runs"]["2"]["predict_median_s"]
    res["speedup_predict"] = p1 / p2 if p1 and p2 else None
    res["speedup_total_wall"] = res["runs"]["1"]["total_wall_median_s"] / res["runs"]["2"]["total_wall_median_s"]
    res["target_speedup"] = DDP_TARGET
    if res["speedup_predict"]:
        res["speedup_over_capacity"] = res["speedup_predict"] / res["capacity"]["speedup"]
    if res["speedup_predict"]:
        log(f"  DDP 2 vs 1 process: {res['speedup_predict']:.2f}x on the prediction loop (target >= {DDP_TARGET}), "
            f"{res['speedup_total_wall']:.2f}x on whole-subprocess wall time")
    return res


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo/fit/last.ckpt", help="DiT checkpoint from `musicattr fit`")
    p.add_argument("--store", default="runs/demo/store", help="latent store from `musicattr encode`")
    p.add_argument("--fisher", default="runs/demo/fisher.safetensors",
                   help="Fisher from `musicattr fisher` (used by the unlearning step; if missing or of another "
                        "checkpoint, the Fisher measured in section 4 is used)")
    p.add_argument("--out", default="runs/bench/attribution.json", help="JSON output")
    p.add_argument("--items", type=int, default=None, help="store items used (default 64; --quick 16)")
    p.add_argument("--draws", type=int, default=None, help="T draws per item (default 8; --quick 4)")
    p.add_argument("--batch-size", type=int, default=16, help="items per scoring batch (as configs/demo/attribute)")
    p.add_argument("--fisher-items", type=int, default=None, help="items in the Fisher batch (default 4; quick 2)")
    p.add_argument("--unlearn-draws", type=int, default=None, help="K query timesteps of the unlearning step "
                                                                   "(default 128; quick 100)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported; default 3, quick 2)")
    p.add_argument("--ddp-repeats", type=int, default=None, help="runs per DDP setting (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: all CPUs)")
    p.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run (about a minute)")
    p.add_argument("--synthetic", action="store_true",
                   help="no demo run: random latent store + random-init demo DiT (labelled synthetic)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: matmul,scoring,ddp,fisher,unlearn")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target (cache ratio, DDP speedup) is missed")
    a = p.parse_args(argv)
    q = a.quick
    a.items = a.items or (16 if q else 64)
    a.draws = a.draws or (4 if q else 8)
    a.fisher_items = a.fisher_items or (2 if q else 4)
    a.unlearn_draws = a.unlearn_draws or (100 if q else 128)
    a.repeats = a.repeats or (2 if q else 3)
    a.ddp_repeats = a.ddp_repeats or (1 if q else 2)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = a.threads or cpus
    torch.set_num_threads(threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    synthetic = bool(a.synthetic)
    if synthetic:
        ckpt, store = build_synthetic(out.parent / "synthetic", max(a.items, a.fisher_items, 1))
        fisher_path = None
    else:
        if not Path(a.checkpoint).exists() or not (Path(a.store) / "index.parquet").exists():
            print(missing_inputs_message(a.checkpoint, a.store), file=sys.stderr)
            return 2
        ckpt, store, fisher_path = a.checkpoint, a.store, a.fisher

    from musicattr.attribution.fisher import load_fisher
    from musicattr.attribution.unlearn import query_batch, save_unlearned
    from musicattr.data.latent_store import LatentStore
    from musicattr.models.diffusion_module import load_diffusion_module
    from musicattr.models.sat import file_fingerprint

    machine = machine_info(threads)
    label = ("SYNTHETIC (random-init demo DiT, random latents)" if synthetic
             else "given checkpoint and store (not synthetic)")
    log(f"bench_attribution: {label}")
    log(f"  checkpoint {ckpt}\n  store      {store}")
    log(f"  torch {machine['torch']}, {threads} torch threads ({machine['torch_interop_threads']} interop), "
        f"{machine['cpu_count']} CPUs ({machine['cpu']}), load average {machine['loadavg_start']}")
    s = LatentStore(store)
    n_items = min(a.items, len(s))
    module = load_diffusion_module(ckpt)
    n_params = sum(p.numel() for p in module.net.parameters())
    log(f"  DiT: {n_params / 1e6:.2f} M parameters, latents {tuple(s.latent_shape)}; {n_items} items x {a.draws} "
        f"draws, batch {a.batch_size}, {a.repeats} timed repeats after warm-up")
    ckpt_fp = file_fingerprint(ckpt)
    result = {"synthetic": synthetic, "label": label, "quick": a.quick,
              "inputs": {"checkpoint": ckpt, "checkpoint_fingerprint": ckpt_fp, "store": store,
                         "store_items": len(s), "fisher": fisher_path, "dit_parameters": n_params,
                         "latent_shape": list(s.latent_shape)},
              "settings": {"items": n_items, "draws": a.draws, "batch_size": a.batch_size,
                           "fisher_items": a.fisher_items, "unlearn_draws": a.unlearn_draws, "repeats": a.repeats,
                           "ddp_repeats": a.ddp_repeats, "threads": threads},
              "machine": machine, "targets": {"cache_ratio": CACHE_TARGET, "ddp_speedup": DDP_TARGET}}
    warm = 1
    work = Path(tempfile.mkdtemp(prefix="bench-attr-"))
    try:
        # 2 (first half). the machine's matmul FLOP/s
        if "matmul" not in a.skip:
            log("\n[2a] matrix-multiply FLOP/s of this machine")
            sizes = [1024] if a.quick else [1024, 2048]
            result["matmul"] = bench_matmul(sizes, ["float32", "bfloat16"], 0.5 if a.quick else 1.0, a.repeats)

        # 4. Fisher: vmap vs loop (also gives the Fisher used when none fits the checkpoint)
        fisher = None
        fisher_num_items = None
        if fisher_path and Path(fisher_path).exists():
            try:
                fisher, meta = load_fisher(fisher_path, ckpt_fp)
                fisher_num_items = int(meta["num_items"])
                result["inputs"]["fisher_source"] = fisher_path
            except Exception as e:  # another checkpoint's Fisher: say so, use the measured one
                log(f"  note: not using {fisher_path}: {e}")
        fb = batches_of(s, a.fisher_items, a.fisher_items)[0]
        if "fisher" not in a.skip or fisher is None:
            log(f"\n[4] Fisher per-sample gradients, {len(fb['item_id'])} items x {a.draws} draws")
            result["fisher"], measured = bench_fisher(module, fb, a.draws, warm, a.repeats, 16)
            if fisher is None:
                fisher, fisher_num_items = measured, max(len(s), 1)
                result["inputs"]["fisher_source"] = "measured in section 4 (synthetic/no matching Fisher file)"

        # 5. one unlearning step (also gives the unlearned tensors scored in sections 1 and 3)
        query = query_batch(query_item=str(s.items["item_id"].iloc[0]), store=store)
        unlearned_file = str(work / "unlearned.safetensors")
        if "unlearn" not in a.skip:
            log(f"\n[5] one unlearning step (Eq. 2, target all, mixed), K={a.unlearn_draws} query timesteps")
            result["unlearn"], new = bench_unlearn(ckpt, query, fisher, fisher_num_items, a.unlearn_draws, warm,
                                                   1 if a.quick else a.repeats, 16)
        else:  # scoring speed does not depend on the values: a small perturbation of the target tensors
            from musicattr.attribution.targets import select_parameters

            gen = torch.Generator().manual_seed(0)
            new = {k: p.detach() + 1e-3 * torch.randn(p.shape, generator=gen)
                   for k, p in select_parameters(module.net, "all").items()}
        save_unlearned(unlearned_file, new, {
            "query_id": query["item_id"][0], "query": None, "query_item": query["item_id"][0], "checkpoint": ckpt,
            "checkpoint_fingerprint": ckpt_fp, "strategy": "mixed", "num_draws": a.unlearn_draws, "steps": 1,
            "target": "all", "lr": 1e-3, "damping": 1e-3, "seed": 0, "num_items": fisher_num_items,
            "note": "written by scripts/bench_attribution.py"})

        # 1 + 2 (second half). scoring throughput and achieved FLOP/s
        if "scoring" not in a.skip:
            log(f"\n[1] scoring throughput (ScoringModule.predict_step, no_grad), {threads} threads")
            batches = batches_of(s, n_items, a.batch_size)
            result["scoring"] = bench_scoring(ckpt, store, unlearned_file, work, batches, a.draws, warm, a.repeats,
                                              16)
            if "matmul" in result:
                peak32 = max(v["flops_per_s"] for v in result["matmul"].values() if v["dtype"] == "float32")
                peak16 = max(v["flops_per_s"] for v in result["matmul"].values() if v["dtype"] == "bfloat16")
                ach = result["scoring"]["flops"]["achieved_flops_per_s"]
                result["scoring"]["flops"].update({"matmul_float32_flops_per_s": peak32,
                                                   "matmul_bfloat16_flops_per_s": peak16,
                                                   "fraction_of_float32_matmul": ach / peak32,
                                                   "fraction_of_bfloat16_matmul": ach / peak16})
                log(f"\n[2] scoring forward {fmt_flops(ach)} = {ach / peak32:.1%} of float32 matmul "
                    f"({fmt_flops(peak32)}), {ach / peak16:.1%} of bfloat16 matmul ({fmt_flops(peak16)})")

        # 3. 1 vs 2 DDP processes on the real `musicattr attribute` stage
        if "ddp" not in a.skip:
            log(f"\n[3] `musicattr attribute`, 1 vs 2 CPU DDP processes (OMP_NUM_THREADS=1 each), {n_items} items x "
                f"{a.draws} draws, baseline recomputed")
            result["ddp"] = bench_ddp(ckpt, store, unlearned_file, work, n_items, a.draws, a.batch_size, 16,
                                      a.ddp_repeats, timeout=600, capacity_iters=20 if a.quick else 40)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result["machine"]["loadavg_end"] = loadavg()
    result["total_s"] = time.perf_counter() - t_start
    checks = {}
    if "scoring" in result:
        checks["cache_ratio"] = result["scoring"]["ratio_cached_over_recompute"] >= CACHE_TARGET
    if "ddp" in result and result["ddp"].get("speedup_predict"):
        checks["ddp_speedup"] = result["ddp"]["speedup_predict"] >= DDP_TARGET
    result["targets_met"] = checks
    out.write_text(json.dumps(result, indent=2, default=str))

    log(f"\nsummary ({label}; load average {machine['loadavg_start']} -> {result['machine']['loadavg_end']}):")
    if "scoring" in result:
        sc = result["scoring"]
        log(f"  1. scoring: cached {sc['cached']['item_timesteps_per_s']:.1f} vs recomputed "
            f"{sc['recompute']['item_timesteps_per_s']:.1f} item-timesteps/s -> "
            f"{sc['ratio_cached_over_recompute']:.2f}x (target >= {CACHE_TARGET})")
        if "fraction_of_float32_matmul" in sc["flops"]:
            f = sc["flops"]
            log(f"  2. scoring forward {fmt_flops(f['achieved_flops_per_s'])} = "
                f"{f['fraction_of_float32_matmul']:.1%} of float32 matmul "
                f"{fmt_flops(f['matmul_float32_flops_per_s'])} (bfloat16 matmul "
                f"{fmt_flops(f['matmul_bfloat16_flops_per_s'])})")
    if "ddp" in result and result["ddp"].get("speedup_predict"):
        d = result["ddp"]
        log(f"  3. DDP: 1 proc {d['runs']['1']['predict_median_s']:.2f} s, 2 procs "
            f"{d['runs']['2']['predict_median_s']:.2f} s -> {d['speedup_predict']:.2f}x (target >= {DDP_TARGET}); "
            f"whole subprocess {d['speedup_total_wall']:.2f}x; the machine gave 2 processes "
            f"{d['capacity']['speedup']:.2f}x")
    if "fisher" in result:
        fi = result["fisher"]
        log(f"  4. Fisher: vmap {fi['vmap']['item_timesteps_per_s']:.1f} vs loop "
            f"{fi['loop']['item_timesteps_per_s']:.1f} item-timesteps/s -> {fi['ratio_vmap_over_loop']:.2f}x")
    if "unlearn" in result:
        log(f"  5. unlearning step: {result['unlearn']['step_s_per_100_timesteps']:.3f} s per 100 query timesteps")
    log(f"  targets met: {checks}; total {result['total_s']:.0f} s; written {out}")
    return 1 if a.strict and not all(checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

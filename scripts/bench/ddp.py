"""Section 3: `musicattr attribute` with 1 vs 2 CPU DDP processes, timed by a Lightning callback."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from bench.common import REPO, log, store_view
from bench.matmul import parallel_capacity

SCRIPTS = Path(__file__).resolve().parents[1]
DDP_TARGET = 1.6

class PredictLoopTimer(L.Callback):
    """Writes this rank's wall-clock times of the prediction loop to ``<out>.r<rank>.json`` (added to the
    `musicattr attribute` subprocesses with ``--trainer.callbacks+=``)."""

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
             "items": self.items, "batches": self.batches, "threads": torch.get_num_threads()}))


def run_attribute(procs: int, checkpoint: str, store: str, unlearned: str, work: Path, draws: int,
                  batch_size: int, draws_per_forward: int, tag: str, timeout: float) -> dict:
    """One `musicattr attribute` subprocess run (DDP over ``procs`` CPU processes); returns its timings."""
    out_dir = work / f"attr-{tag}"
    timer = work / f"timer-{tag}"
    cb = json.dumps({"class_path": "bench.ddp.PredictLoopTimer", "init_args": {"out": str(timer)}})
    cmd = [sys.executable, "-m", "musicattr.cli", "attribute", "--config", "configs/demo/attribute.yaml",
           "--model.checkpoint", checkpoint, "--data.store", store, "--model.unlearned", unlearned,
           "--model.out_dir", str(out_dir), "--model.num_draws", str(draws), "--data.batch_size", str(batch_size),
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

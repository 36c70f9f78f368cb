#!/usr/bin/env python
"""Attribution benchmark: prints figures and writes them (with the machine) to a JSON file.

The sections live in scripts/bench/ (common, matmul, scoring, ddp, fisher, unlearn), each over the public
API of musicattr; this file parses the options, runs them and prints the summary.

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
   Method: a Lightning callback (``bench.ddp.PredictLoopTimer``, added with
   ``--trainer.callbacks+=``) records on every rank the wall-clock time of on_predict_start and
   on_predict_end; the prediction time is max(end) - min(start) over ranks, i.e. the scoring loop
   only (data loading, forward passes, part writing), without interpreter start-up, imports,
   checkpoint loading, DDP set-up or the final merge. The subprocess's total wall time is reported
   too. Target speedup >= 1.6.
4. Fisher throughput (item-timesteps/s): ``squared_grads_vmap`` vs ``squared_grads_loop`` on the same batch.
5. one unlearning step (``unlearn_query``: ``query_gradient`` + ``eq2_update``, steps=1) with
   ``--unlearn-draws`` query timesteps (>= 100), reported per 100 query timesteps.
6. the attribution index vs exact scoring, per item on the same items and draws (``bench.index``): the
   build (``IndexModule.predict_step``, k = ``--index-k``) at n and 4n items vs one exact ``attribute``
   pass (baseline cached), and a query (its gradient with ``--unlearn-draws`` draws + the lookup on
   synthetic indexes of N and 4N rows, N the store's size and ``--lookup-rows``) vs the exact pass over
   the store; index bytes per item. Targets: build <= 3 exact passes, a query <= 1% of one.
   ``--device cuda`` runs this section on a GPU.

Every figure is the median of ``--repeats`` timed runs after warm-up. The numbers depend on the
load of the machine: the load average at start and end is written with them.

``--synthetic`` builds (under ``<out dir>/synthetic/``) a latent store of random latents and a
randomly initialised checkpoint of the demo model config (configs/demo/fit.yaml); the Fisher is then
the one measured in section 4. Everything in the output is labelled synthetic.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (REPO, batches_of, build_synthetic, fmt_flops, loadavg, log, machine_info,
                          missing_inputs_message)
from bench.ddp import DDP_TARGET, bench_ddp
from bench.fisher import bench_fisher
from bench.index import BUILD_TARGET, QUERY_TARGET, bench_index
from bench.matmul import bench_matmul
from bench.scoring import CACHE_TARGET, bench_scoring
from bench.unlearn import bench_unlearn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_root", default="runs/demo", help="the run whose files are the defaults below")
    p.add_argument("--checkpoint", help="DiT checkpoint from `musicattr fit` (default <run_root>/fit/last.ckpt)")
    p.add_argument("--store", help="latent store from `musicattr encode` (default <run_root>/store)")
    p.add_argument("--fisher",
                   help="Fisher from `musicattr fisher` (default <run_root>/fisher.safetensors; used by the "
                        "unlearning step; if missing or of another checkpoint, the Fisher measured in section 4 is "
                        "used)")
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
    p.add_argument("--skip", default="",
                   help="comma-separated sections to skip: matmul,scoring,ddp,fisher,unlearn,index")
    p.add_argument("--index-k", type=int, default=32768, help="sketch size of the index section")
    p.add_argument("--index-items", type=int, default=None, help="items of the index section (and 4x; default 16, "
                                                                  "quick 4)")
    p.add_argument("--index-draws", type=int, default=None, help="T of the index section (default 32 as "
                                                                  "configs/demo/attribute.yaml; quick 8)")
    p.add_argument("--lookup-rows", type=int, default=4096, help="rows of the larger synthetic index (and 4x)")
    p.add_argument("--device", default="cpu", help="device of the index section (cuda: the GPU run)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target (cache ratio, DDP speedup) is missed")
    a = p.parse_args(argv)
    a.checkpoint = a.checkpoint or f"{a.run_root}/fit/last.ckpt"
    a.store = a.store or f"{a.run_root}/store"
    a.fisher = a.fisher or f"{a.run_root}/fisher.safetensors"
    q = a.quick
    a.items = a.items or (16 if q else 64)
    a.draws = a.draws or (4 if q else 8)
    a.fisher_items = a.fisher_items or (2 if q else 4)
    a.unlearn_draws = a.unlearn_draws or (100 if q else 128)
    a.repeats = a.repeats or (2 if q else 3)
    a.ddp_repeats = a.ddp_repeats or (1 if q else 2)
    a.index_items = a.index_items or (4 if q else 16)
    a.index_draws = a.index_draws or (8 if q else 32)
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
        ckpt, store = build_synthetic(out.parent / "synthetic", max(a.items, 4 * a.index_items, a.fisher_items, 1))
        fisher_path = None
    else:
        if not Path(a.checkpoint).exists() or not (Path(a.store) / "index.parquet").exists():
            print(missing_inputs_message(a.checkpoint, a.store), file=sys.stderr)
            return 2
        ckpt, store, fisher_path = a.checkpoint, a.store, a.fisher

    from musicattr.attribution.fisher import load_fisher
    from musicattr.attribution.task import load_theta
    from musicattr.attribution.unlearn import save_unlearned
    from musicattr.data.queries import query_batch
    from musicattr.data.latent_store import LatentStore
    from musicattr.fingerprint import file_fingerprint

    machine = machine_info(threads)
    label = ("SYNTHETIC (random-init demo DiT, random latents)" if synthetic
             else "given checkpoint and store (not synthetic)")
    log(f"bench_attribution: {label}")
    log(f"  checkpoint {ckpt}\n  store      {store}")
    log(f"  torch {machine['torch']}, {threads} torch threads ({machine['torch_interop_threads']} interop), "
        f"{machine['cpu_count']} CPUs ({machine['cpu']}), load average {machine['loadavg_start']}")
    s = LatentStore(store)
    n_items = min(a.items, len(s))
    task, model = load_theta(None, ckpt)  # the default task: the SAT DiT of `musicattr fit`
    n_params = sum(p.numel() for p in task.net(model).parameters())
    log(f"  DiT: {n_params / 1e6:.2f} M parameters, latents {tuple(s.latent_shape)}; {n_items} items x {a.draws} "
        f"draws, batch {a.batch_size}, {a.repeats} timed repeats after warm-up")
    ckpt_fp = file_fingerprint(ckpt)
    result = {"synthetic": synthetic, "label": label, "quick": a.quick,
              "inputs": {"checkpoint": ckpt, "checkpoint_fingerprint": ckpt_fp, "store": store,
                         "store_items": len(s), "fisher": fisher_path, "dit_parameters": n_params,
                         "latent_shape": list(s.latent_shape)},
              "settings": {"items": n_items, "draws": a.draws, "batch_size": a.batch_size,
                           "fisher_items": a.fisher_items, "unlearn_draws": a.unlearn_draws, "repeats": a.repeats,
                           "ddp_repeats": a.ddp_repeats, "threads": threads, "index_items": a.index_items,
                           "index_draws": a.index_draws, "index_k": a.index_k, "device": a.device},
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
            result["fisher"], measured = bench_fisher(task, model, fb, a.draws, warm, a.repeats, 16)
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
            gen = torch.Generator().manual_seed(0)
            new = {k: p.detach() + 1e-3 * torch.randn(p.shape, generator=gen)
                   for k, p in task.select_parameters(model, "all").items()}
        save_unlearned(unlearned_file, new, {
            "query_id": query["item_id"][0], "query": None, "query_item": query["item_id"][0], "checkpoint": ckpt,
            "checkpoint_fingerprint": ckpt_fp, "strategy": "mixed", "num_draws": a.unlearn_draws, "steps": 1,
            "target": "all", "lr": 1e-3, "damping": 1e-3, "seed": 0, "num_items": fisher_num_items,
            "note": "written by scripts/bench_attribution.py"})

        # 1 + 2 (second half). scoring throughput and achieved FLOP/s
        if "scoring" not in a.skip:
            log(f"\n[1] scoring throughput (ScoringModule.predict_step, no_grad), {threads} threads")
            batches = batches_of(s, n_items, a.batch_size)
            result["scoring"] = bench_scoring(ckpt, unlearned_file, work, batches, a.draws, warm, a.repeats,
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

        # 6. the attribution index vs exact scoring
        if "index" not in a.skip:
            n_ix = min(a.index_items, len(s))
            log(f"\n[6] attribution index (k = {a.index_k}) vs exact scoring, {n_ix} and {min(4 * n_ix, len(s))} "
                f"items x {a.index_draws} draws, on {a.device}")
            batches = batches_of(s, n_ix, a.batch_size)
            batches4 = batches_of(s, min(4 * n_ix, len(s)), a.batch_size)
            fisher_file = fisher_path if fisher_path and result["inputs"].get("fisher_source") == fisher_path else None
            if fisher_file is None:  # the Fisher measured in section 4, written with the metadata the index reads
                from safetensors.torch import save_file

                fisher_file = str(work / "fisher.safetensors")
                save_file({k: v.float().contiguous() for k, v in fisher.items()}, fisher_file, metadata={
                    "checkpoint_fingerprint": json.dumps(ckpt_fp), "num_items": json.dumps(fisher_num_items)})
            result["index"] = bench_index(ckpt, fisher_file, unlearned_file, work, batches, batches4, a.index_draws,
                                          a.index_k, query, a.unlearn_draws, len(s), a.repeats, a.device,
                                          a.lookup_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result["machine"]["loadavg_end"] = loadavg()
    result["total_s"] = time.perf_counter() - t_start
    checks = {}
    if "scoring" in result:
        checks["cache_ratio"] = result["scoring"]["ratio_cached_over_recompute"] >= CACHE_TARGET
    if "ddp" in result and result["ddp"].get("speedup_predict"):
        checks["ddp_speedup"] = result["ddp"]["speedup_predict"] >= DDP_TARGET
    if "index" in result:
        checks["index_build"] = result["index"]["ratio_build_over_exact"] <= BUILD_TARGET
        checks["index_query"] = result["index"]["ratio_query_over_exact"] <= QUERY_TARGET
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
    if "index" in result:
        ix = result["index"]
        log(f"  6. index (k={ix['k']}, {ix['device']}): build {ix['ratio_build_over_exact']:.2f} exact passes "
            f"(target <= {BUILD_TARGET}); query {ix['ratio_query_over_exact']:.2%} of an exact pass (target <= "
            f"{QUERY_TARGET:.0%}; lookup alone {ix['ratio_lookup_over_exact']:.3%}); {ix['bytes_per_item'] / 1024:.1f} "
            f"KiB per item")
    log(f"  targets met: {checks}; total {result['total_s']:.0f} s; written {out}")
    return 1 if a.strict and not all(checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The attribution index at the paper's scale (configs/paper): index size, build time and query time.

    .venv/bin/python scripts/index_paper_scale.py [--bench runs/bench/attribution.json]

Counts, on the meta device (no weights, no GPU): the target parameters of the paper's DiT and the FLOPs of
one (t, eps) draw at 2584 latent frames, forward (an exact scoring draw) and forward + backward to the
target tensors (an index draw, a query-gradient draw), with torch's FlopCounterMode. Then:

    index size    N (4 k + 16) bytes                                (phi in float32, s_i and L_i in float64)
    exact pass    N T F_fwd          the paper: 5 h on 8 H100 (Section 3.1) -> the achieved FLOP/s R_exact
    build         N T F_fwd+bwd / R_exact  (+ the sketch: one pass over the parameters per item)
    query         K F_fwd+bwd        the paper: one unlearning step, K = 2048, 20 min on one H100
                  + lookup: read N k 4 bytes and 2 N k FLOPs per query
    (with ``--bench``: the build / exact time ratio measured on the demo, next to the FLOP ratio)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

PAPER_ITEMS = 115_000                  # Section 3.1: 115k tracks
PAPER_EXACT_PASS_GPU_S = 5 * 3600 * 8  # "around 5 hours using 8 H100 GPUs"
PAPER_UNLEARN_STEP_S = 20 * 60         # "a single step takes approximately 20 minutes on an H100", K = 2048
PAPER_UNLEARN_K = 2048


def flops_per_draw(model_config: dict, frames: int, target: str = "all") -> tuple[int, float, float, int]:
    """(target parameters, forward FLOPs, forward+backward FLOPs, all parameters) of one draw, on meta tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from musicattr.models.diffusion_module import DiffusionModule
    from musicattr.models.sat_task import SATDiffusionTask

    with torch.device("meta"):
        module = DiffusionModule(model_config)
    task = SATDiffusionTask()
    params = task.select_parameters(module, target)
    channels = int(model_config["model"]["io_channels"])
    text = int(model_config["model"]["conditioning"]["cond_dim"])
    with torch.device("meta"):
        z, eps = torch.zeros(1, channels, frames), torch.zeros(1, channels, frames)
        t, emb = torch.full((1,), 0.5), torch.zeros(1, 1, text)
    cond = task.conditioning(module, {"latents": z, "text_emb": emb, "seconds_start": torch.zeros(1),
                              "seconds_total": torch.full((1,), 120.0)})
    with FlopCounterMode(display=False) as fc:
        task.draw_loss(module, z, t, eps, cond)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        task.draw_loss(module, z, t, eps, cond).sum().backward(inputs=list(params.values()))
    return sum(p.numel() for p in params.values()), float(fwd), float(fc.get_total_flops()), \
        sum(p.numel() for p in module.net.parameters())


def gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config_dir", default="configs/paper")
    ap.add_argument("--items", type=int, default=PAPER_ITEMS, help="N training tracks (the paper: 115k)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--bench", help="runs/bench/attribution.json of `make bench` (the demo's measured ratios)")
    ap.add_argument("--read_gb_per_s", type=float, default=2.0, help="bandwidth reading the index (disk or cache)")
    ap.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args(argv)
    cfg = Path(a.config_dir)
    fit = yaml.safe_load((cfg / "fit.yaml").read_text())["model"]["model_config"]
    index = yaml.safe_load((cfg / "index.yaml").read_text())["model"]
    query = yaml.safe_load((cfg / "query.yaml").read_text())
    frames = int(fit["sample_size"]) // 2048
    n, T, k, K = a.items, int(index["num_draws"]), int(index["k"]), int(query["num_draws"])
    params, f_fwd, f_fb, all_params = flops_per_draw(fit, frames, index["target"])
    rate = n * T * f_fwd / PAPER_EXACT_PASS_GPU_S           # achieved FLOP/s per GPU of the paper's exact pass
    rate_grad = PAPER_UNLEARN_K * f_fb / PAPER_UNLEARN_STEP_S  # ... of its unlearning step
    exact_gpu_s = PAPER_EXACT_PASS_GPU_S
    build_gpu_s = n * T * f_fb / rate
    size = n * (4 * k + 16)
    grad_s = K * f_fb / rate_grad
    lookup_s = n * k * 4 / (a.read_gb_per_s * 1e9) + 2 * n * k / rate
    r = {"items": n, "draws_T": T, "k": k, "query_draws_K": K, "latent_frames": frames, "target": index["target"],
         "target_parameters": params, "dit_parameters": all_params, "flops_forward_per_draw": f_fwd,
         "flops_forward_backward_per_draw": f_fb, "flop_ratio_build_over_exact": f_fb / f_fwd,
         "index_bytes": size, "index_bytes_per_item": 4 * k + 16,
         "achieved_flops_per_gpu_exact_pass": rate, "achieved_flops_per_gpu_unlearn_step": rate_grad,
         "exact_pass_gpu_hours": exact_gpu_s / 3600, "build_gpu_hours": build_gpu_s / 3600,
         "build_hours_on_gpus": build_gpu_s / a.gpus / 3600, "query_gradient_gpu_s": grad_s,
         "lookup_s": lookup_s, "query_over_exact_pass_gpu_time": (grad_s + lookup_s) / exact_gpu_s,
         "sketch_state_bytes": 5 * params, "preconditioner_bytes": 4 * params}
    print(f"configs/paper at the paper's scale: N = {n:,} tracks, {frames} latent frames, T = {T} scoring draws, "
          f"K = {K} query draws, k = {k:,}")
    print(f"  DiT: {all_params / 1e9:.2f} B parameters, {params / 1e9:.2f} B in the target tensors ({index['target']})")
    print(f"  FLOPs per draw (FlopCounterMode, meta device): forward {f_fwd / 1e12:.2f} TFLOP, forward + backward "
          f"to the target tensors {f_fb / 1e12:.2f} TFLOP ({f_fb / f_fwd:.2f}x)")
    print(f"  index size: N (4k + 16) B = {gb(size)} ({(4 * k + 16) / 1024:.0f} KiB per item; k = {k // 2:,}: "
          f"{gb(n * (2 * k + 16))})")
    print(f"  exact pass (the paper): 5 h on {a.gpus} H100 = {exact_gpu_s / 3600:.0f} GPU-hours "
          f"-> {rate / 1e12:.0f} TFLOP/s achieved per GPU at T = {T}")
    print(f"  build: N T x {f_fb / 1e12:.2f} TFLOP = {n * T * f_fb:.2e} FLOP -> {build_gpu_s / 3600:.0f} GPU-hours, "
          f"{hours(build_gpu_s / a.gpus)} on {a.gpus} GPUs = {build_gpu_s / exact_gpu_s:.2f} exact passes "
          f"(the sketch adds one pass over {params / 1e9:.2f} B parameters per item, "
          f"{5 * params / 1e9:.1f} GB of hashes)")
    print(f"  query: gradient K x {f_fb / 1e12:.2f} TFLOP = the paper's unlearning step: {hours(grad_s)} on one GPU "
          f"({hours(grad_s / a.gpus)} over {a.gpus}); lookup {lookup_s:.1f} s (read {gb(n * k * 4)} at "
          f"{a.read_gb_per_s:g} GB/s); = {100 * (grad_s + lookup_s) / exact_gpu_s:.2f}% of an exact pass in GPU time")
    print(f"  query from an unlearned file (psi = (F + lambda)^1/2 (theta_u - theta0), no gradient): the lookup, "
          f"{lookup_s:.1f} s = {100 * lookup_s / (exact_gpu_s / a.gpus):.3f}% of an exact pass's "
          f"{a.gpus}-GPU wall time")
    if a.bench and Path(a.bench).exists():
        b = json.loads(Path(a.bench).read_text()).get("index")
        if b:
            r["demo_build_over_exact_measured"] = b["ratio_build_over_exact"]
            print(f"  measured on the demo ({b['device']}, T = {b['draws']}): build / exact pass "
                  f"{b['ratio_build_over_exact']:.2f} in time vs {f_fb / f_fwd:.2f} in FLOPs -> build at the "
                  f"paper's scale ~ {b['ratio_build_over_exact'] * 5:.1f} h on {a.gpus} GPUs at the demo's ratio")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput of the DiT on one device, and its MFU (model FLOPs utilisation) against the device's peak:
the measuring half of ``scripts/gpu_check.sh``.

    python -m musicattr.models.throughput peak             the GPU's name and the peaks used, with their source
    python -m musicattr.models.throughput bench --config configs/paper/fit.yaml --device cuda \\
        --precisions 32-true,bf16-mixed [--frames 2584] [--batch 1] [--repeats 3] [--json out.json]
    python -m musicattr.models.throughput stage --config configs/demo/fit.yaml --name attribute \\
        --store runs/demo/store --draws 64 --passes 2f+1fb --seconds 41.5 --precision 32-true [--json out.json]

``bench`` builds the DiT of a fit config (``model.model_config``; the paper's: 1.04 B parameters) on the device
and times one draw's loss (the attribution task's ``draw_loss``, the v-objective over all frames) as a forward
pass (no gradients: scoring) and as a forward + backward pass over every parameter (a fit step without the
optimizer), under each precision: ``32-true`` (float32) or ``bf16-mixed`` (Lightning's ``MixedPrecision`` plugin's
bfloat16 autocast, as ``--trainer.precision bf16-mixed`` runs fit and the Fisher). One untimed warm-up, then the
median of ``repeats``, with the device synchronised around each. ``stage`` turns a whole stage's wall time
(start-up included) into item-timesteps per second and MFU, from the FLOPs of its passes per item-timestep
(``2f+1fb``: two forwards and one forward + backward, as ``attribute`` with the relative score).

FLOPs per draw are counted by torch's ``FlopCounterMode`` on the meta device (matrix multiplies and attention;
elementwise work is not counted, as MFU conventionally does not), as ``scripts/index_paper_scale.py`` does.
MFU = FLOPs / seconds / peak, the peak being the device's dense (no sparsity) rate for the precision's matrix
multiplies: bf16 for ``bf16-mixed``; for ``32-true`` the float32 rate, or TF32's when torch lets float32
matrix multiplies use TF32 (``torch.get_float32_matmul_precision() != "highest"``; musicattr never does).
The peaks come from ``MUSICATTR_PEAK_BF16_TFLOPS`` / ``MUSICATTR_PEAK_FP32_TFLOPS`` (``..._TF32_TFLOPS``) when
set, else from ``PEAKS`` (NVIDIA's datasheets) by the name ``nvidia-smi --query-gpu=name`` gives; every result
says which. An unknown GPU without the variables gets no MFU, only timings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ENV = {"bf16": "MUSICATTR_PEAK_BF16_TFLOPS", "fp32": "MUSICATTR_PEAK_FP32_TFLOPS", "tf32": "MUSICATTR_PEAK_TF32_TFLOPS"}

# (substrings all in the GPU's name, label, dense TFLOP/s: bf16, fp32 (no tensor cores), tf32); first match wins
PEAKS: list[tuple[tuple[str, ...], str, float, float, float]] = [
    (("H200", "NVL"), "H200 NVL", 835.5, 60.0, 417.5),
    (("H200",), "H200 SXM", 989.4, 66.9, 494.7),
    (("H100", "PCIe"), "H100 PCIe", 756.5, 51.2, 378.0),
    (("H100", "NVL"), "H100 NVL", 835.5, 60.0, 417.5),
    (("H100",), "H100 SXM", 989.4, 66.9, 494.7),
    (("A100",), "A100", 312.0, 19.5, 156.0),
    (("L40S",), "L40S", 362.1, 91.6, 183.0),
    (("L40",), "L40", 181.0, 90.5, 90.5),
    (("L4",), "L4", 121.0, 30.3, 60.0),
    (("A10",), "A10", 125.0, 31.2, 62.5),
    (("RTX 4090",), "GeForce RTX 4090", 165.2, 82.6, 82.6),
]
PRECISIONS = ("32-true", "bf16-mixed")


# ---------------------------------------------------------------------------------------------- peaks
def gpu_name() -> str | None:
    """The first GPU's name as ``nvidia-smi --query-gpu=name`` gives it (else torch's), or None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def peak_tflops(name: str | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """{"bf16", "fp32", "tf32": TFLOP/s or None, "source": where they come from, "gpu": name}: the environment
    variables of ``ENV`` first, each on its own, else the ``PEAKS`` row whose substrings are all in ``name``."""
    env = os.environ if env is None else env
    row = next((r for r in PEAKS if name and all(s.lower() in name.lower() for s in r[0])), None)
    out: dict[str, Any] = {"gpu": name}
    sources = []
    for i, kind in enumerate(("bf16", "fp32", "tf32")):
        if env.get(ENV[kind]):
            out[kind] = float(env[ENV[kind]])
            sources.append(f"{kind} from ${ENV[kind]}")
        elif row is not None:
            out[kind] = float(row[2 + i])
            sources.append(f"{kind} from the table ({row[1]}, NVIDIA datasheet, dense)")
        else:
            out[kind] = None
    out["source"] = "; ".join(sources) if sources else (
        f"unknown GPU {name!r}: no MFU; fix: set {ENV['bf16']} and {ENV['fp32']} (dense TFLOP/s)")
    return out


def peak_for(peaks: dict[str, Any], precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, which one) for a run at ``precision``: bf16 for bf16-mixed; fp32, or tf32 when torch allows
    TF32 in float32 matrix multiplies, for 32-true."""
    if precision == "bf16-mixed":
        return peaks.get("bf16"), "bf16"
    if torch.get_float32_matmul_precision() != "highest":
        return peaks.get("tf32"), "tf32"
    return peaks.get("fp32"), "fp32"


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    return None if not peak or seconds <= 0 else flops / seconds / (peak * 1e12)


# ---------------------------------------------------------------------------------------------- the model
def model_config(config: str | Path) -> dict:
    """``model.model_config`` of a fit config (configs/*/fit.yaml)."""
    import yaml

    return yaml.safe_load(Path(config).read_text())["model"]["model_config"]


def frames_of(mc: dict) -> int:
    """Latent frames of a model config: sample_size / 2048 (the autoencoders' downsampling)."""
    return int(mc["sample_size"]) // 2048


def _inputs(mc: dict, batch: int, frames: int, device) -> dict[str, Any]:
    channels, text = int(mc["model"]["io_channels"]), int(mc["model"]["conditioning"]["cond_dim"])
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(batch, channels, frames, generator=g).to(device),
            "text_emb": torch.randn(batch, 1, text, generator=g).to(device),
            "seconds_start": torch.zeros(batch), "seconds_total": torch.full((batch,), frames * 2048 / float(
                mc["sample_rate"]))}


def flops_per_draw(mc: dict, frames: int) -> dict[str, float]:
    """{"forward", "forward_backward", "parameters"}: FLOPs of one draw's loss at ``frames`` latent frames, forward
    and forward + backward over every parameter of the DiT (meta tensors: nothing is allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    from musicattr.models.diffusion_module import DiffusionModule
    from musicattr.models.sat_task import SATDiffusionTask

    with torch.device("meta"):
        module = DiffusionModule(mc, use_checkpointing=False)
    batch = _inputs_meta(mc, frames)
    task = SATDiffusionTask()
    cond = task.conditioning(module, batch)
    z, t = batch["latents"], torch.full((1,), 0.5, device="meta")
    with FlopCounterMode(display=False) as fc:
        task.draw_loss(module, z, t, torch.zeros_like(z), cond)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        task.draw_loss(module, z, t, torch.zeros_like(z), cond).sum().backward(inputs=list(module.net.parameters()))
    return {"forward": float(fwd), "forward_backward": float(fc.get_total_flops()),
            "parameters": float(sum(p.numel() for p in module.net.parameters()))}


def _inputs_meta(mc: dict, frames: int) -> dict[str, Any]:
    """One item on the meta device (its timing on the CPU: the conditioners read it as numbers)."""
    channels, text = int(mc["model"]["io_channels"]), int(mc["model"]["conditioning"]["cond_dim"])
    return {"latents": torch.zeros(1, channels, frames, device="meta"),
            "text_emb": torch.zeros(1, 1, text, device="meta"),
            "seconds_start": torch.zeros(1), "seconds_total": torch.full((1,), 120.0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | str, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``, each between two device synchronisations."""
    device = torch.device(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _autocast(precision: str, device: torch.device):
    import contextlib

    if precision == "32-true":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        from lightning.pytorch.plugins.precision import MixedPrecision

        return MixedPrecision("bf16-mixed", device.type).forward_context()
    raise ValueError(f"precision {precision!r}; fix: one of {', '.join(PRECISIONS)}")


def bench(mc: dict, device: str = "cuda", precisions=PRECISIONS, frames: int | None = None, batch: int = 1,
          repeats: int = 3, peaks: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Time one draw's loss of the DiT of ``mc`` (forward; forward + backward over every parameter) at each
    precision on ``device``: one row per (precision, pass) with the median seconds of ``repeats`` after a
    warm-up, items per second, TFLOP/s and MFU against ``peaks`` (``peak_tflops``; None: no MFU)."""
    from musicattr.models.diffusion_module import DiffusionModule
    from musicattr.models.sat_task import SATDiffusionTask

    dev = torch.device(device)
    frames = frames or frames_of(mc)
    flops = flops_per_draw(mc, frames)
    with torch.device(dev):  # built on the device: a 1 B-parameter DiT is not initialised on the CPU first
        module = DiffusionModule(mc, use_checkpointing=False)
    module = module.to(dev)  # Lightning's record of its device
    task = SATDiffusionTask()
    inputs = _inputs(mc, batch, frames, dev)
    t = torch.rand(batch, generator=torch.Generator().manual_seed(1)).to(dev)
    eps = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(2)).to(dev)
    params = list(module.net.parameters())
    rows = []
    for precision in precisions:
        for name, grad in (("forward", False), ("forward+backward", True)):
            def once():
                with torch.set_grad_enabled(grad), _autocast(precision, dev):
                    cond = task.conditioning(module, inputs)
                    loss = task.draw_loss(module, inputs["latents"], t, eps, cond).sum()
                if grad:
                    loss.backward(inputs=params)
                    for p in params:
                        p.grad = None
                return float(loss.detach())

            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            once()  # warm-up: kernels chosen, memory allocated
            times = timed(once, dev, repeats)
            seconds = statistics.median(times)
            total = batch * flops["forward_backward" if grad else "forward"]
            peak, kind = peak_for(peaks or {}, precision)
            rows.append({"pass": name, "precision": precision, "device": dev.type, "frames": frames, "batch": batch,
                         "parameters": flops["parameters"], "seconds": seconds, "times": times,
                         "items_per_s": batch / seconds, "tflop": total / 1e12, "tflops": total / seconds / 1e12,
                         "peak_tflops": peak, "peak_kind": kind, "mfu": mfu(total, seconds, peak),
                         "max_memory_gb": (torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None)})
    return rows


PASSES = {"f": "forward", "fb": "forward_backward"}


def parse_passes(spec: str) -> dict[str, int]:
    """'2f+1fb' -> {"forward": 2, "forward_backward": 1}: the passes of one item-timestep of a stage."""
    out = {"forward": 0, "forward_backward": 0}
    for term in spec.replace(" ", "").split("+"):
        digits = "".join(ch for ch in term if ch.isdigit())
        kind = term[len(digits):]
        if kind not in PASSES or not term.startswith(digits):
            raise ValueError(f"passes {spec!r}: terms like 2f (forwards) or 1fb (forward + backward), joined by +")
        out[PASSES[kind]] += int(digits or 1)
    return out


def stage(mc: dict, name: str, units: int, passes: str, seconds: float, precision: str, frames: int | None = None,
          peaks: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole stage's throughput: ``units`` item-timesteps in ``seconds`` (wall, start-up included), each of the
    passes ``passes`` (``parse_passes``) at ``frames``; TFLOP/s and MFU at ``precision``'s peak."""
    frames = frames or frames_of(mc)
    flops = flops_per_draw(mc, frames)
    n = parse_passes(passes)
    per_unit = n["forward"] * flops["forward"] + n["forward_backward"] * flops["forward_backward"]
    peak, kind = peak_for(peaks or {}, precision)
    return {"stage": name, "precision": precision, "units": units, "passes": passes, "seconds": seconds,
            "units_per_s": units / seconds if seconds > 0 else None, "tflop": units * per_unit / 1e12,
            "tflops": units * per_unit / seconds / 1e12 if seconds > 0 else None, "peak_tflops": peak,
            "peak_kind": kind, "mfu": mfu(units * per_unit, seconds, peak), "frames": frames}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _write(path: str | None, record: dict) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(p.read_text()) if p.exists() else []
        p.write_text(json.dumps([*old, record], indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m musicattr.models.throughput", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("peak", help="the GPU's name and the peaks MFU uses, with their source")
    b = sub.add_parser("bench", help="time the DiT's forward and forward + backward of a fit config")
    s = sub.add_parser("stage", help="a stage's wall time as item-timesteps/s and MFU")
    for p in (b, s):
        p.add_argument("--config", required=True, help="a fit config (its model.model_config)")
        p.add_argument("--frames", type=int, help="latent frames (default: the config's sample_size / 2048)")
        p.add_argument("--json", help="append the results to this JSON list")
    b.add_argument("--device", default="cuda")
    b.add_argument("--precisions", default=",".join(PRECISIONS))
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=3)
    s.add_argument("--name", required=True)
    s.add_argument("--store", help="a latent store: units = its items x --draws")
    s.add_argument("--items", type=int, help="items (instead of --store)")
    s.add_argument("--draws", type=int, required=True, help="timesteps per item")
    s.add_argument("--passes", required=True, help="passes per item-timestep, e.g. 2f+1fb")
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--precision", default="32-true")
    a = ap.parse_args(argv)

    peaks = peak_tflops(gpu_name())
    if a.command == "peak":
        print(f"GPU: {peaks['gpu']}; peak dense TFLOP/s bf16 {peaks['bf16']}, fp32 {peaks['fp32']}, tf32 "
              f"{peaks['tf32']} ({peaks['source']}); float32 matmul precision: {torch.get_float32_matmul_precision()}")
        return 0
    mc = model_config(a.config)
    if a.command == "bench":
        rows = bench(mc, a.device, a.precisions.split(","), a.frames, a.batch, a.repeats, peaks)
        print(f"{a.config}: {rows[0]['parameters'] / 1e9:.3f} B parameters, {rows[0]['frames']} frames, batch "
              f"{a.batch}, {a.device}; peaks: {peaks['source']}")
        for r in rows:
            mem = f", peak memory {r['max_memory_gb']:.1f} GB" if r["max_memory_gb"] is not None else ""
            print(f"  {r['precision']:>10} {r['pass']:<17} {r['seconds'] * 1e3:9.1f} ms  "
                  f"{r['tflop'] * 1e3:10.4g} GFLOP  "
                  f"{r['tflops']:8.3g} TFLOP/s  MFU {_pct(r['mfu'])} of {r['peak_kind']} {r['peak_tflops']}{mem}")
        for r in rows:
            _write(a.json, {"kind": "bench", "config": a.config, "peaks": peaks, **r})
        return 0
    if a.store:
        from musicattr.data.latent_store import LatentStore

        items = len(LatentStore(a.store).items)
    elif a.items:
        items = a.items
    else:
        ap.error("stage needs --store or --items")
    r = stage(mc, a.name, items * a.draws, a.passes, a.seconds, a.precision, a.frames, peaks)
    print(f"{a.name} ({a.precision}): {r['units']} item-timesteps in {a.seconds:.1f} s (wall, start-up included) = "
          f"{r['units_per_s']:.1f}/s, {r['tflops']:.3g} TFLOP/s, MFU {_pct(r['mfu'])} of {r['peak_kind']} "
          f"{r['peak_tflops']} ({peaks['source']})")
    _write(a.json, {"kind": "stage", "config": a.config, "peaks": peaks, **r})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the attribution benchmark: timing, machine description, inputs (demo or synthetic)."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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

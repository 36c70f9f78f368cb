#!/usr/bin/env python
"""A paper-scale rehearsal (``make rehearse``): every stage that touches the model, run as the real CLI stage
with configs/paper's DiT on the CPU, on a handful of synthetic latents of the paper's shape.

    .venv/bin/python scripts/rehearse.py [--scale 1] [--items 4] [--out runs/rehearse]

Writes a synthetic latent store (``--items`` latents of 64 channels x 2584 frames, one 512-d text token as CLAP
gives, timing of a two-minute track), then runs, each as ``musicattr <stage> --config configs/paper/<stage>.yaml
--run_root <out>/run ...`` in its own process on one CPU device (no wandb):

    fit (a few AdamW steps in the config's precision, bf16-mixed through Lightning's plugin, where this CPU runs
    bf16 matmuls at least as fast as float32, else 32-true) -> fisher -> [ekfac (kronfluence's factors of the
    linear layers; only when --stages names it: 56 GB at the paper's depth)] -> unlearn (configs/paper's diagonal
    Fisher, or AbU+ with the ekfac factors; a training item as the query) -> attribute (Eq. 1, relative) -> index
    (k of the config) -> query (a query gradient and the unlearned file against the index) -> report (the
    attribute table's page)

and prints per stage: wall time, peak resident memory of the stage's process (``os.wait4``'s ru_maxrss), FLOPs
per item-timestep (torch's FlopCounterMode on the meta device, ``scripts/index_paper_scale.flops_per_draw``), the
CPU's achieved FLOP/s, and the extrapolation

    time = units x FLOPs per unit / (gpus x MFU x peak)        (default 8 GPUs, 40% of an H100's 989 TFLOP/s bf16)

with units = 115k tracks x 16 timesteps for the per-item stages (fit: 16 epochs of one timestep per track) and
K = 2048 query draws for unlearn and query. ``--scale`` s < 1 keeps every stage but builds the DiT with
round(s x depth) blocks (the paper's width, so a block's memory and FLOPs are the paper's); ``--width`` also
shrinks the width (the test's tiny model). Figures go to ``<out>/rehearse.json`` and ``<out>/rehearse.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from index_paper_scale import PAPER_ITEMS, flops_per_draw  # noqa: E402  the shared FLOP counter

STAGES = ("fit", "fisher", "ekfac", "unlearn", "attribute", "index", "query", "report")
DEFAULT_STAGES = tuple(s for s in STAGES if s != "ekfac")
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
QUERY_ITEM = "synthetic/track000.wav"  # the query of unlearn and query: a training item (train-to-train)
PAPER_T = 16              # scoring timesteps per track (configs/paper/attribute.yaml, index.yaml)
PAPER_FIT_DRAWS = 8       # EK-FAC's (item, draw) examples per track (configs/paper/ekfac.yaml)


def _file_checkpoint_io():
    """Lightning's TorchCheckpointIO serializes a checkpoint into an in-memory buffer and copies it out (two copies of
    the weights: 8 GB at 1 B parameters); this one streams torch.save into a temporary file beside the target and
    renames it (atomic, no copy in memory). The same file."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class FileCheckpointIO(TorchCheckpointIO):
        __doc__ = _file_checkpoint_io.__doc__

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            import torch

            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)

    return FileCheckpointIO


def __getattr__(name: str):
    """``rehearse.FileCheckpointIO`` (fit's ``--trainer.plugins``), built on first use so that this script's own
    process never imports torch or Lightning."""
    if name == "FileCheckpointIO":
        return _file_checkpoint_io()
    raise AttributeError(name)


def matmul_gflops(dtype_name: str, threads: int, seconds: float = 1.0) -> float:
    """This CPU's rate for a [256, 1536] x [1536, 1536] matmul (the DiT's width) in ``dtype_name``, GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(256, 1536).to(dtype), torch.randn(1536, 1536).to(dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 256 * 1536 * 1536 * n / (time.perf_counter() - t0) / 1e9


def _probe(mc: dict, frames: int, threads: int, store: str | None, items: int, channels: int, text_dim: int):
    """(flops_per_draw, matmul rates, torch version), and the synthetic store written when ``store`` is given."""
    import shutil

    import torch

    if store is not None:
        shutil.rmtree(store, ignore_errors=True)
        write_store(Path(store), items, channels, frames, text_dim)
    rates = {d: matmul_gflops(d, threads) for d in ("float32", "bfloat16")}
    return flops_per_draw(mc, frames, "all"), rates, torch.__version__


def paper_config(config_dir: Path) -> dict:
    return yaml.safe_load((config_dir / "fit.yaml").read_text())


def scaled_model_config(fit: dict, scale: float, width: int | None) -> dict:
    """The fit config's model_config with round(scale x depth) blocks (at least 1) and, with ``width``, that
    embedding width (heads of 64 dims, at least 1)."""
    mc = copy.deepcopy(fit["model"]["model_config"])
    dit = mc["model"]["diffusion"]["config"]
    dit["depth"] = max(1, round(scale * int(dit["depth"])))
    if width:
        dit["embed_dim"] = int(width)
        dit["num_heads"] = max(1, int(width) // 64)
    return mc


def write_store(root: Path, items: int, channels: int, frames: int, text_dim: int, seed: int = 0) -> None:
    """A latent store of ``items`` synthetic latents [channels, frames] (unit normal, float16 as encode writes),
    one text token of ``text_dim`` each, two-minute timing; one shard per item."""
    import numpy as np

    from musicattr.data.latent_store import LatentStoreWriter

    g = np.random.default_rng(seed)
    seconds = int(round(frames * 2048 / 44100))
    w = LatentStoreWriter(root, {"format": 1, "latent_channels": channels, "max_frames": frames, "sample_rate": 44100,
                                 "audio_channels": 2, "downsampling_ratio": 2048, "text_encoder": "synthetic",
                                 "text_dim": text_dim})
    for i in range(items):
        lat = g.standard_normal((1, channels, frames)).astype(np.float32)
        text = g.standard_normal((1, 1, text_dim)).astype(np.float32)
        w.write_shard(f"r0-{i:09d}", lat, text, [{"index": i, "item_id": f"synthetic/track{i:03d}.wav",
                                                   "caption": f"synthetic track {i}",
                                                   "file_name": f"synthetic/track{i:03d}.wav", "valid_frames": frames,
                                                   "seconds_start": 0, "seconds_total": seconds,
                                                   "duration_s": frames * 2048 / 44100}])
    w.finalize(expected=items)


def run_stage(cmd: list[str], env: dict, log: Path) -> dict:
    """Run one stage; its wall time and peak resident memory (ru_maxrss of that process from os.wait4, and the
    largest VmRSS seen by polling /proc every 0.2 s as a check), and the largest RssAnon polled: the memory the
    kernel cannot reclaim (resident pages of memory-mapped files count in RSS but are dropped under pressure)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = {"kb": 0, "anon_kb": 0}
        done = threading.Event()

        def poll():
            while not done.is_set():
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            peak["kb"] = max(peak["kb"], int(line.split()[1]))
                        elif line.startswith("RssAnon:"):
                            peak["anon_kb"] = max(peak["anon_kb"], int(line.split()[1]))
                except (FileNotFoundError, ProcessLookupError, ValueError):
                    pass
                done.wait(0.2)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - t0, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "polled_rss_gb": peak["kb"] * 1024 / 1e9, "polled_anon_gb": peak["anon_kb"] * 1024 / 1e9,
            "returncode": proc.returncode, "log": str(log)}


def stage_commands(a, run: Path, cfg: Path, override: Path | None) -> dict[str, list[str]]:
    """The CLI command of each stage: the paper config, this machine's device, a few steps / draws / items."""
    ma = [str(ROOT / ".venv" / "bin" / "musicattr")] if (ROOT / ".venv" / "bin" / "musicattr").exists() else \
        [sys.executable, "-m", "musicattr.cli"]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
           "--trainer.num_nodes", "1"]
    data = ["--data.batch_size", "1", "--data.num_workers", "0"]
    rr = ["--run_root", str(run)]
    unlearned = str(run / "unlearned" / "q000.safetensors")
    ckpt_cb = (f"[{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {{dirpath: {run / 'fit'}, "
               f"save_last: true, save_weights_only: {str(a.weights_only).lower()}, "
               f"every_n_train_steps: {a.steps}}}}}]")
    fit = [*ma, "fit", "--config", str(cfg / "fit.yaml"), *(["--config", str(override)] if override else []), *rr,
           *cpu, *data, "--data.val_items", "1", "--trainer.max_steps", str(a.steps), "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.log_every_n_steps", "1", "--trainer.callbacks", ckpt_cb, "--model.warmup_steps", "1",
           "--trainer.plugins", "rehearse.FileCheckpointIO"]
    if a.precision and a.precision != "auto":
        fit += ["--trainer.precision", a.precision]
    task = "{class_path: musicattr.models.sat_task.SATDiffusionTask, init_args: {checkpointing: true}}"
    lt, ft = (["--model.task", task], ["--task", task]) if a.checkpointing else ([], [])
    return {
        "fit": fit,
        # a part per batch: the writer's running float64 sum is not held beside the next batch's (8 B per parameter
        # each); the paper's GPU hosts keep flush_every 200 in host memory
        "fisher": [*ma, "fisher", "--config", str(cfg / "fisher.yaml"), *rr, *cpu, *data, "--model.num_draws",
                   str(a.draws), "--model.chunk_size", "1", "--model.overwrite", "true", "--model.flush_every", "1", *lt],
        "unlearn": [*ma, "unlearn", "--config", str(cfg / "unlearn.yaml"), *rr, "--query", "null", "--query_item",
                    QUERY_ITEM, "--num_draws", str(a.query_draws), "--draws_per_forward", "1", "--device", "cpu",
                    # AbU+ (the demo's default) with ekfac's factors, else configs/paper's own diagonal Fisher
                    *(["--ekfac", str(run / "ekfac")] if a.unlearn_with == "ekfac" else []), *ft],
        # kronfluence hooks the layers' forward and backward: the task's gradient checkpointing (a second forward
        # inside the backward) is not passed to it
        "ekfac": [*ma, "ekfac", "--config", str(cfg / "ekfac.yaml"), *rr, "--fit_draws", str(a.draws),
                  "--batch_size", "1", "--device", "cpu"],
        "attribute": [*ma, "attribute", "--config", str(cfg / "attribute.yaml"), *rr, *cpu, *data,
                      "--model.num_draws", str(a.draws), "--model.draws_per_forward", "1", "--model.overwrite", "true",
                      *lt],
        "index": [*ma, "index", "--config", str(cfg / "index.yaml"), *rr, *cpu, *data, "--model.num_draws",
                  str(a.draws), "--model.draws_per_forward", "1", "--model.overwrite", "true",
                  *(["--model.k", str(a.k)] if a.k else []), *lt],
        "query": [*ma, "query", "--config", str(cfg / "query.yaml"), *rr, "--queries", "[]", "--query_items",
                  f"[{QUERY_ITEM}]", "--unlearned", f"[{unlearned}]", "--num_draws", str(a.query_draws),
                  "--draws_per_forward", "1", "--device", "cpu", *ft],
        "report": [*ma, "report", "--config", str(cfg / "report.yaml"), *rr, "--scores",
                   str(run / "attribution" / "q000"), "--compare", "null", "--similarity", "none",
                   "--track_spectrograms", "false", "--audio_format", "wav"],
    }


def stage_flops(stage: str, f_fwd: float, f_fb: float, checkpointing: bool, task_checkpointing: bool = False
                ) -> tuple[float, str]:
    """FLOPs per unit of a stage (forward f_fwd, forward + backward f_fb of one item-timestep) and the unit; gradient
    checkpointing (fit's; the task's in unlearn, attribute, index, query) adds one forward to each gradient."""
    re = f_fwd if task_checkpointing else 0.0
    return {
        "fit": (f_fb + (f_fwd if checkpointing else 0.0), "item-timestep (one training example)"),
        "fisher": (f_fb + re, "item-timestep (a per-sample gradient)"),
        "ekfac": (2 * f_fb, "item-timestep (kronfluence's covariance and eigenvalue-correction passes)"),
        "unlearn": (f_fb + re, "query draw"),
        "attribute": (2 * f_fwd + f_fb + re, "item-timestep (theta0 and unlearned forwards + the relative score's "
                                             "gradient)"),
        "index": (f_fb + re, "item-timestep"),
        "query": (f_fb + re, "query draw (+ the lookup)"),
        "report": (0.0, "-"),
    }[stage]


def executed_units(stage: str, a) -> float:
    """How many units the rehearsal's stage ran (for the CPU's achieved FLOP/s)."""
    return {"fit": a.steps, "fisher": a.items * a.draws, "ekfac": a.items * a.draws, "unlearn": a.query_draws,
            "attribute": a.items * a.draws + a.draws / 3.0,  # + the float-error probe's forward (1/3 of a unit)
            "index": a.items * a.draws, "query": a.query_draws, "report": 0}[stage]


def paper_units(stage: str, items: int, query_draws: int) -> float:
    if stage == "ekfac":
        return items * PAPER_FIT_DRAWS
    return query_draws if stage in ("unlearn", "query") else items * PAPER_T


def fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def combine(paths: list[str], depth: int, out: Path, config_dir: str = "configs/paper") -> dict:
    """The full-depth figures from two rehearsals at depths d1 < d2 (the same width, frames, items and draws):
    blocks are identical, so a stage's peak memory is linear in depth, M(D) = M1 + (D - d1) (M2 - M1) / (d2 - d1):
    the fixed part (Python, torch, the embedders, I/O) and the per-block part (weights, gradients, optimizer
    moments, the Fisher, sketch hashes, activations) measured separately. Wall time on this CPU: the deeper run's
    time scaled by the FLOPs, t(D) = t2 F(D) / F(d2) (a shared machine's times are too noisy for a line)."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["depth"])
    (a, b), keys = runs, ("width", "frames", "items", "draws", "query_draws", "fit_steps", "fit_precision")
    diff = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
    if len(runs) != 2 or a["depth"] == b["depth"] or diff:
        raise SystemExit(f"rehearse --combine: needs two rehearse.json of different depths and the same {keys} "
                         f"(differences: {diff}); fix: rerun one with the other's options")
    span = b["depth"] - a["depth"]
    mc = paper_config(Path(config_dir))["model"]["model_config"]
    _, f_fwd, f_fb, _ = flops_per_draw(mc, b["frames"], "all")
    flops = {st: stage_flops(st, f_fwd, f_fb, True, s.get("task_checkpointing", False))[0]
             for st, s in ((s["stage"], s) for s in b["stages"])}
    sa, sb = ({s["stage"]: s for s in r["stages"]} for r in (a, b))
    rows = []
    for st in [s for s in STAGES if s in sa and s in sb]:
        x, y = sa[st], sb[st]
        mem = x["peak_rss_gb"] + (depth - a["depth"]) * (y["peak_rss_gb"] - x["peak_rss_gb"]) / span
        ratio = flops[st] / y["flops_per_unit"] if y["flops_per_unit"] else 1.0
        asm = b["assumption"]
        rate = asm["gpus"] * asm["mfu"] * asm["peak_flops"]
        paper = paper_units(st, asm["paper_items"], asm["paper_query_draws"]) * flops[st] / rate
        rows.append({"stage": st, "seconds": y["seconds"] * ratio, "peak_rss_gb": mem, "flops_per_unit": flops[st],
                     "paper_seconds": paper, "unit": y["unit"],
                     "task_checkpointing": y.get("task_checkpointing", False),
                     "per_block_gb": (y["peak_rss_gb"] - x["peak_rss_gb"]) / span,
                     "fixed_gb": x["peak_rss_gb"] - a["depth"] * (y["peak_rss_gb"] - x["peak_rss_gb"]) / span,
                     "measured": {a["depth"]: x["peak_rss_gb"], b["depth"]: y["peak_rss_gb"]},
                     "measured_seconds": {a["depth"]: x["seconds"], b["depth"]: y["seconds"]}})
    res = {"depth": depth, "from_depths": [a["depth"], b["depth"]], "width": a["width"], "frames": a["frames"],
           "items": a["items"], "draws": a["draws"], "stages": rows}
    md = [f"Depth {depth} extrapolated from measured depths {a['depth']} and {b['depth']} (width {a['width']}, "
          f"{a['frames']} frames, {a['items']} items, {a['draws']} draw(s), fit {a['fit_steps']} steps "
          f"{a['fit_precision']}; linear in depth)", "",
          f"| stage | peak RSS GB, depth {a['depth']} | depth {b['depth']} | per block GB | depth {depth} GB | "
          f"wall s, depth {a['depth']} | depth {b['depth']} | depth {depth} (by FLOPs) | task checkpointing | "
          f"TFLOP per unit, depth {depth} | paper scale on GPUs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, t = list(r["measured"].values()), list(r["measured_seconds"].values())
        md.append(f"| {r['stage']} | {m[0]:.2f} | {m[1]:.2f} | {r['per_block_gb']:.3f} | {r['peak_rss_gb']:.1f} | "
                  f"{t[0]:.0f} | {t[1]:.0f} | {fmt_time(r['seconds'])} | {'yes' if r['task_checkpointing'] else 'no'} | "
                  f"{r['flops_per_unit'] / 1e12:.2f} | {fmt_time(r['paper_seconds']) if r['paper_seconds'] else '-'} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "rehearse_full_depth.json").write_text(json.dumps(res, indent=2))
    (out / "rehearse_full_depth.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config_dir", default="configs/paper")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the DiT's depth built (1: the paper's)")
    ap.add_argument("--width", type=int, help="embedding width (default: the config's); heads of 64 dims")
    ap.add_argument("--frames", type=int, help="latent frames (default: the config's sample_size / 2048 = 2584)")
    ap.add_argument("--items", type=int, default=4, help="synthetic training latents")
    ap.add_argument("--steps", type=int, default=2, help="fit steps (batch 1)")
    ap.add_argument("--draws", type=int, default=1, help="timesteps per item in fisher, attribute and index")
    ap.add_argument("--query_draws", type=int, default=1, help="K of unlearn and query")
    ap.add_argument("--k", type=int, help="the index's k (default: the config's)")
    ap.add_argument("--precision", default="auto",
                    help="fit's trainer.precision; auto (default): the config's (bf16-mixed), unless this CPU's bf16 "
                         "matmul is slower than its float32 one (no AVX-512 BF16 or AMX: 60x slower measured), then "
                         "32-true (the same weights and moments in memory, no bf16 copy)")
    ap.add_argument("--weights_only", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                    help="fit's checkpoint without the optimizer state (the later stages read the weights only)")
    ap.add_argument("--checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=False,
                    help="the SAT task's gradient checkpointing in fisher, unlearn, attribute, index and query (the same "
                         "numbers; activations of one block instead of all)")
    ap.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                    help=f"comma-separated, of {','.join(STAGES)} (default: all but ekfac, whose factors take 56 GB at "
                         "the paper's depth; configs/paper unlearns with the diagonal Fisher)")
    ap.add_argument("--unlearn_with", choices=("ekfac", "diagonal"),
                    help="unlearn's preconditioner: ekfac (AbU+, the factors of the ekfac stage; the default when "
                         "--stages has ekfac) or diagonal (configs/paper's own, ekfac: null; the default otherwise)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--peak_flops", type=float, default=H100_BF16_FLOPS)
    ap.add_argument("--paper_items", type=int, default=PAPER_ITEMS)
    ap.add_argument("--paper_query_draws", type=int, default=2048)
    ap.add_argument("--out", default="runs/rehearse")
    ap.add_argument("--combine", nargs=2, metavar="REHEARSE_JSON",
                    help="instead of running: the full-depth memory and time from two rehearsals at two depths")
    a = ap.parse_args(argv)
    if a.combine:
        combine(a.combine, int(paper_config(Path(a.config_dir))["model"]["model_config"]["model"]["diffusion"]
                               ["config"]["depth"]), Path(a.out), a.config_dir)
        return 0
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"rehearse: unknown stages {bad}; fix: choose from {','.join(STAGES)}")
    if a.unlearn_with is None:
        a.unlearn_with = "ekfac" if "ekfac" in stages else "diagonal"
    cfg = Path(a.config_dir)
    if not (cfg / "fit.yaml").is_file():
        raise SystemExit(f"rehearse: {cfg / 'fit.yaml'} not found; fix: pass --config_dir configs/paper")
    out = Path(a.out)
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    fit = paper_config(cfg)
    mc = scaled_model_config(fit, a.scale, a.width)
    frames = a.frames or int(mc["sample_size"]) // 2048
    mc["sample_size"] = frames * 2048
    override = None
    if mc != fit["model"]["model_config"]:
        override = out / "model_override.yaml"
        override.write_text(yaml.safe_dump({"model": {"model_config": mc}}))
    channels, text_dim = int(mc["model"]["io_channels"]), int(mc["model"]["conditioning"]["cond_dim"])
    checkpointing = bool(fit["model"].get("use_checkpointing", True))

    # the FLOP count, the matmul rates and the store are made in a child process: this one never imports torch, so
    # the stages (each its own process) have the machine's memory less this script's ~0.1 GB, not ~1.2 GB
    store = run / "store"
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        (params, f_fwd, f_fb, all_params), rates, torch_version = pool.apply(
            _probe, (mc, frames, a.threads, str(store) if "fit" in stages or not (store / "index.parquet").exists()
                     else None, a.items, channels, text_dim))
    precision = a.precision
    if precision == "auto":   # the documented rule: bf16 only where this CPU runs it at least as fast as float32
        precision = fit["trainer"].get("precision", "32-true")
        if "bf16" in precision and rates["bfloat16"] < rates["float32"]:
            precision = "32-true"
    a.precision = precision
    print(f"rehearsal: DiT of {all_params / 1e9:.3f} B parameters (depth {mc['model']['diffusion']['config']['depth']}, "
          f"width {mc['model']['diffusion']['config']['embed_dim']}), latents {channels} x {frames}, text 1 x "
          f"{text_dim}; {a.items} items, fit {a.steps} steps in {precision}, {a.draws} draw(s) per item, K = "
          f"{a.query_draws}; {a.threads} thread(s); torch {torch_version}")
    print(f"  FLOPs per item-timestep (FlopCounterMode, meta device): forward {f_fwd / 1e12:.3f} TFLOP, forward + "
          f"backward {f_fb / 1e12:.3f} TFLOP")
    print(f"  this CPU's matmul at the DiT's shape: float32 {rates['float32']:.1f} GFLOP/s, bfloat16 "
          f"{rates['bfloat16']:.2f} GFLOP/s ({a.threads} thread(s))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "MUSICATTR_TEST_THREADS": str(a.threads), "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    cmds = stage_commands(a, run, cfg, override)
    rate = a.gpus * a.mfu * a.peak_flops
    (out / "logs").mkdir(exist_ok=True)
    results = {}
    if (out / "rehearse.json").exists():  # a run of some stages keeps the figures of the others
        old = json.loads((out / "rehearse.json").read_text())
        if old.get("dit_parameters") == all_params and old.get("frames") == frames:
            results = {s["stage"]: s for s in old.get("stages", [])}
    for stage in stages:
        r = run_stage(cmds[stage], env, out / "logs" / f"{stage}.log")
        per_unit, unit = stage_flops(stage, f_fwd, f_fb, checkpointing, a.checkpointing)
        units = executed_units(stage, a)
        paper = paper_units(stage, a.paper_items, a.paper_query_draws)
        r.update(stage=stage, task_checkpointing=a.checkpointing and stage in ("fisher", "unlearn", "attribute", "index", "query"),
                 command=" ".join(cmds[stage]), flops_per_unit=per_unit, unit=unit,
                 units_run=units, cpu_flops_per_s=per_unit * units / r["seconds"] if per_unit else None,
                 paper_units=paper if per_unit else 0,
                 paper_seconds=paper * per_unit / rate if per_unit else 0.0)
        status = "ok" if r["returncode"] == 0 else f"FAILED (exit {r['returncode']}, see {r['log']})"
        print(f"  {stage:<9} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_gb']:6.2f} GB (anonymous "
              f"{r['polled_anon_gb']:.2f})  "
              f"{per_unit / 1e12:7.3f} TFLOP per unit  {status}", flush=True)
        results[stage] = r
        if r["returncode"] != 0:
            print(Path(r["log"]).read_text()[-3000:])
            break
    ok = all(results.get(s, {}).get("returncode") == 0 for s in stages)
    report = {"dit_parameters": all_params, "target_parameters": params, "frames": frames, "channels": channels,
              "text_dim": text_dim, "depth": mc["model"]["diffusion"]["config"]["depth"],
              "width": mc["model"]["diffusion"]["config"]["embed_dim"], "scale": a.scale, "items": a.items,
              "fit_steps": a.steps, "draws": a.draws, "query_draws": a.query_draws, "fit_precision": precision,
              "threads": a.threads, "checkpointing": a.checkpointing, "unlearn_with": a.unlearn_with, "cpu_matmul_gflops": rates, "flops_forward": f_fwd, "flops_forward_backward": f_fb,
              "assumption": {"gpus": a.gpus, "mfu": a.mfu, "peak_flops": a.peak_flops, "paper_items": a.paper_items,
                             "paper_T": PAPER_T, "paper_query_draws": a.paper_query_draws},
              "memory_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
              "all_ok": ok, "stages": [results[s] for s in STAGES if s in results]}
    (out / "rehearse.json").write_text(json.dumps(report, indent=2))
    md = [f"DiT {all_params / 1e9:.3f} B parameters (depth {report['depth']}, width {report['width']}), latents "
          f"{channels} x {frames}, {a.items} items, {a.threads} thread(s); extrapolation: {a.gpus} GPUs at "
          f"{100 * a.mfu:.0f}% of {a.peak_flops / 1e12:.0f} TFLOP/s, {a.paper_items:,} tracks x {PAPER_T} timesteps "
          f"(unlearn, query: K = {a.paper_query_draws})", "",
          "| stage | wall s | peak RSS GB | peak anonymous GB | TFLOP per unit | unit | CPU GFLOP/s | paper scale on GPUs |",
          "|---|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        cpu = f"{s['cpu_flops_per_s'] / 1e9:.0f}" if s.get("cpu_flops_per_s") else "-"
        paper = fmt_time(s["paper_seconds"]) if s["paper_seconds"] else "-"
        anon = f"{s['polled_anon_gb']:.2f}" if s.get("polled_anon_gb") else "-"
        md.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_gb']:.2f} | {anon} | {s['flops_per_unit'] / 1e12:.3f} | "
                  f"{s['unit']} | {cpu} | {paper} |")
    (out / "rehearse.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

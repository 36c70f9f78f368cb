"""Self-influence grid search (paper Section 3.2, Table 1).

For each target training item z_tar (k-means over audio embeddings picks diverse targets) and each
unlearning configuration (lr, steps, target layer group, masking strategy): unlearn z_tar from
theta0 (Eq. 2), score every training item (Eq. 1), and measure
  R(z_tar)   the target's rank among the scores (1 = best), averaged over targets,
  sim_topk   mean embedding cosine similarity between z_tar and the k highest-scored items,
  sim_botk   the same for the k lowest-scored items (the target itself excluded),
  FD         Frechet distance between generations of the unlearned model and the training audio,
             next to theta0's,
  R_rel      with ``relative``, the target's rank by the relative score tau_i / s_i (RelatIF, see
             ``musicattr.attribution.sensitivity``), reported next to the paper's R(z_tar).
  R_index    with ``index`` (a ``musicattr index``), the target's rank by the index's first-order scores of
             the same unlearned weights (and R_index_rel by their relative score), for the configurations
             whose tensors and M_L are the index's.
Rows are appended to ``runs.csv`` as they finish, so an interrupted grid resumes. Each row carries the
settings it was made with and their hash (``run_key``: the configuration, the target, K, T, damping,
seed, k, the checkpoint, Fisher and store fingerprints, the audio encoder, the FD settings); a rerun
reuses and reports only rows of its own key, so a row is never relabelled with other settings.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from musicattr.atomic import atomic_write_json, atomic_write_text
from musicattr.attribution.masks import resolve_masks
from musicattr.attribution.similarity import store_audio_embeddings
from musicattr.attribution.settings import ScoreSettings, UnlearnSettings
from musicattr.attribution.unlearn import load_unlearned, run_unlearn
from musicattr.data.latent_store import LatentStore
from musicattr.attribution.task import AttributionTask, resolve_task
from musicattr.evaluation.common import diverse_items, generate_audio, score_store, unlearn_device
from musicattr.wandb_logger import open_wandb
from musicattr.evaluation.metrics import frechet_distance, target_rank, topk_bottomk_similarity
from musicattr.fingerprint import file_fingerprint

CONFIG_KEYS = ["target", "strategy", "lr", "steps"]
log = logging.getLogger(__name__)


def grid_configs(configs: list[dict] | None, lrs: list[float], steps: list[int], groups: list[str],
                 strategies: list[str]) -> list[dict]:
    """Explicit configs, or the product lrs x steps x groups x strategies."""
    if configs:
        return [{"target": c["target"], "strategy": c["strategy"], "lr": float(c["lr"]), "steps": int(c["steps"])}
                for c in configs]
    return [{"target": g, "strategy": s, "lr": float(lr), "steps": int(n)}
            for lr, n, g, s in itertools.product(lrs, steps, groups, strategies)]


def config_name(c: dict) -> str:
    return f"{c['target']}-{c['strategy']}-lr{c['lr']:g}-s{c['steps']}"


def run_key(settings: dict, cfg: dict, target_item: str) -> str:
    """Hash of everything a grid row depends on: the grid's settings, the configuration and the target."""
    text = json.dumps({**settings, **cfg, "target_item": target_item}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def frechet_of_model(checkpoint: str, unlearned: str | None, store: LatentStore, encoder, reference: torch.Tensor,
                     samples: int, steps: int, seed: int) -> float:
    """FD between embeddings of generations (captions of the first training items) and the reference set."""
    from musicattr.models.autoencoder_module import store_autoencoder
    from musicattr.models.diffusion_module import load_diffusion_module

    module = load_diffusion_module(checkpoint)
    if unlearned:
        named = dict(module.net.named_parameters())
        with torch.no_grad():
            for k, v in load_unlearned(unlearned)[0].items():
                named[k].copy_(v)
    ae = store_autoencoder(store.manifest)
    items = [store[i] for i in range(min(samples, len(store)))]
    audio = generate_audio(module, ae, torch.stack([it["text_emb"] for it in items]),
                           [max(1.0, it["seconds_total"]) for it in items], store.latent_shape[1], steps, seed)
    emb = torch.stack([encoder.embed_track(a, module.sample_rate) for a in audio])
    return frechet_distance(emb, reference)


def run_grid(checkpoint: str, store: str, fisher: str, out_dir: str, num_targets: int = 8,
             target_items: list[str] | None = None, configs: list[dict] | None = None,
             lrs: list[float] = (1e-6,), steps: list[int] = (1,), groups: list[str] = ("all",),
             strategies: list[str] = ("mixed",), unlearning: UnlearnSettings = UnlearnSettings(num_draws=256),
             scoring: ScoreSettings = ScoreSettings(draws=8), top_k: int | None = None, audio_encoder: str = "aisfx",
             audio_encoder_checkpoint: str | None = None, fd_samples: int = 8, fd_steps: int = 25,
             fd_targets: int = 1, seed: int = 0, use_wandb: bool = True, index: str | None = None,
             task: AttributionTask | None = None, trainer: dict | None = None) -> pd.DataFrame:
    """Run the self-influence grid and write table1.md / table1.csv / runs.csv under ``out_dir``.

    Args:
        checkpoint: theta0; store: the latent store; fisher: the diagonal Fisher of theta0.
        num_targets: targets chosen by k-means over training audio embeddings (the paper: 40),
            unless ``target_items`` names them. Planted duplicates are never chosen.
        configs: explicit list of {target, strategy, lr, steps}; else the product of lrs, steps, groups, strategies.
        unlearning: Eq. 2's K query draws (num_draws) and damping; the grid sets target, strategy, lr and steps.
        scoring: Eq. 1's T draws per item, batch size, and ``relative`` (also rank by tau_i / s_i, one extra
            gradient pass per target group and mask, cached).
        top_k: k of sim_topk / sim_botk (the paper: 100 of 115k); default max(5, N // 32).
        audio_encoder: embeddings for target selection, similarities and FD ('aisfx' offline; 'clap' with a checkpoint).
        fd_samples / fd_steps / fd_targets: generations per FD, sampler steps, and how many targets get an FD.
        index: an attribution index of this checkpoint, Fisher, damping and T = scoring.draws: also rank the target
            by its scores (R_index, R_index_rel) for the configurations with the index's tensors and M_L.
        task: the attribution task (default: the SAT DiT of ``musicattr fit``); the FD generations use SAT's
            sampler whatever the task.
        trainer: Trainer options of the scoring passes (``--trainer.*``, as in the Lightning stages).
    """
    from musicattr.embeddings.audio import build_audio_encoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = LatentStore(store)
    k = top_k or max(5, len(s) // 32)
    encoder = build_audio_encoder(audio_encoder, audio_encoder_checkpoint)
    emb = store_audio_embeddings(s, encoder)
    track_emb = emb.track_means().float()
    ids = list(s.items["item_id"])
    # 1. the targets, the grid, and the settings every row is keyed by
    targets = [ids.index(t) for t in target_items] if target_items else diverse_items(s, track_emb, num_targets, seed)
    grid = grid_configs(configs, list(lrs), list(steps), list(groups), list(strategies))
    settings = {"num_draws": unlearning.num_draws, "score_draws": scoring.draws, "damping": unlearning.damping,
                "seed": seed, "top_k": k, "checkpoint_fingerprint": file_fingerprint(checkpoint),
                "fisher_fingerprint": file_fingerprint(fisher), "store_fingerprint": s.fingerprint,
                "audio_encoder": encoder.name, "audio_encoder_fingerprint": emb.meta.get("checkpoint_fingerprint"),
                "fd_samples": fd_samples, "fd_steps": fd_steps, "fd_targets": fd_targets,
                "relative": scoring.relative, **resolve_task(task).identity()}
    ctx = None
    if index:
        from musicattr.attribution.query import open_query

        ctx = open_query(index, checkpoint, fisher, store, damping=unlearning.damping, score_draws=scoring.draws,
                         score_seed=seed, task=task)
        prov = json.dumps(ctx.index.provenance, sort_keys=True).encode()
        settings["index_fingerprint"] = hashlib.blake2b(prov, digest_size=8).hexdigest()  # rows are keyed by it
    atomic_write_json(out / "setup.json", {"targets": [ids[t] for t in targets], "configs": grid, **settings})
    # 2. one row per (configuration, target), appended to runs.csv as it finishes (a rerun resumes)
    runs_csv = out / "runs.csv"
    done = pd.read_csv(runs_csv) if runs_csv.exists() else pd.DataFrame()
    if len(done) and "run_key" not in done:
        done["run_key"] = ""  # rows written before rows were keyed: never reused
    keys = {(ci, ti): run_key(settings, cfg, ids[t]) for ci, cfg in enumerate(grid) for ti, t in enumerate(targets)}
    total = len(grid) * len(targets)
    for ci, cfg in enumerate(grid):
        for ti, t in enumerate(targets):
            if len(done) and (done["run_key"] == keys[ci, ti]).any():
                continue
            row = grid_row(cfg, t, ti, ids, out, checkpoint, fisher, store, s, encoder, track_emb, k, unlearning,
                           scoring, seed, trainer, task, ctx, fd_samples, fd_steps, fd_targets)
            row = {"run_key": keys[ci, ti], **row, **settings}
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            atomic_write_text(runs_csv, done.to_csv(index=False))
            log.info("[grid %d/%d] %s target=%s rank=%s rank_rel=%s top%d=%.3f bot%d=%.3f fd=%.2f",
                     ci * len(targets) + ti + 1, total, row["config"], ids[t], row["rank"], row["rank_rel"], k,
                     row["sim_topk"], k, row["sim_botk"], row["fd"])
    # 3. Table 1: the mean over targets per configuration, next to theta0's FD
    current = done[done["run_key"].isin(set(keys.values()))]
    fd_original = frechet_of_model(checkpoint, None, s, encoder, track_emb, fd_samples, fd_steps, seed)
    table = summarize(current, grid, encoder.name, k, fd_original, len(s))
    write_table(table, out, encoder.name, k, fd_original)
    run = open_wandb("table1", {"checkpoint": checkpoint, "targets": len(targets), "top_k": k}, use_wandb)
    if run is not None:
        import wandb

        run.log({"table1": wandb.Table(dataframe=table), "runs": wandb.Table(dataframe=current)})
        run.finish()
    return table


def grid_row(cfg: dict, t: int, ti: int, ids: list[str], out: Path, checkpoint: str, fisher: str, store: str,
             s: LatentStore, encoder, track_emb: torch.Tensor, k: int, unlearning: UnlearnSettings,
             scoring: ScoreSettings, seed: int, trainer, task, ctx, fd_samples: int, fd_steps: int,
             fd_targets: int) -> dict:
    """One configuration on one target: unlearn it (Eq. 2), score the store (Eq. 1), and measure its rank,
    the top-k / bottom-k similarities, the index's ranks and (for the first ``fd_targets``) the FD. The
    reference set of the FD is every training track."""
    name = config_name(cfg)
    run_dir = out / "runs" / name / f"target{ti:03d}"
    unlearned = str(run_dir / "unlearned.safetensors")
    settings = replace(unlearning, lr=cfg["lr"], steps=cfg["steps"], target=cfg["target"], strategy=cfg["strategy"])
    run_unlearn(checkpoint, fisher, unlearned, query_item=ids[t], store=store, **settings.kwargs(), seed=seed,
                device=unlearn_device(trainer), reuse=True, task=task)
    table = score_store(checkpoint, store, unlearned, str(run_dir), scoring.draws, seed, scoring.batch_size, trainer,
                        mask_loss=resolve_masks(cfg["strategy"])[1], relative=scoring.relative, task=task)
    by_index = table.sort_values("index")
    scores = torch.tensor(by_index["score"].to_numpy())
    top, bot = topk_bottomk_similarity(scores, track_emb, track_emb[t], k, exclude_index=t)
    row = {"config": name, **cfg, "target_item": ids[t], "target_duration_s": float(s.items["duration_s"][t]),
           "rank": target_rank(scores, t), "sim_topk": top, "sim_botk": bot, "score_target": float(scores[t]),
           "score_median": float(scores.median()), "fd": math.nan,
           "rank_rel": (target_rank(torch.tensor(by_index["relative_score"].to_numpy()), t)
                        if scoring.relative else math.nan)}
    if ctx is not None:
        row.update(index_ranks(ctx, cfg, unlearned, t, ids[t]))
    if ti < fd_targets:
        row["fd"] = frechet_of_model(checkpoint, unlearned, s, encoder, track_emb, fd_samples, fd_steps, seed)
    return row


def index_ranks(ctx, cfg: dict, unlearned: str, t: int, item_id: str) -> dict[str, float]:
    """The target's rank by the index's scores of an unlearned file (psi from its weights), when the
    configuration unlearns the index's tensors with its M_L; NaN otherwise."""
    from musicattr.attribution.query import index_table

    prov = ctx.index.provenance
    same = (sorted(ctx.task.select_parameters(ctx.model, cfg["target"])) == prov["tensors"]
            and resolve_masks(cfg["strategy"])[1] == prov["mask_loss"])
    if not same:
        return {"rank_index": math.nan, "rank_index_rel": math.nan}
    psi, _ = ctx.from_unlearned(unlearned)
    table = index_table(ctx.index, ctx.store, ctx.scores([psi])[:, 0], item_id, True).sort_values("index")
    return {"rank_index": target_rank(torch.tensor(table["score"].to_numpy()), t),
            "rank_index_rel": target_rank(torch.tensor(table["relative_score"].to_numpy()), t)}


def summarize(runs: pd.DataFrame, grid: list[dict], encoder: str, k: int, fd_original: float, n: int) -> pd.DataFrame:
    """One row per configuration: mean over targets (Table 1)."""
    rows = []
    for cfg in grid:
        r = runs[runs["config"] == config_name(cfg)]
        mu, ml = resolve_masks(cfg["strategy"])
        rel = r["rank_rel"] if "rank_rel" in r else pd.Series([math.nan] * len(r), dtype=float)
        ix = {c: (r[c].mean() if c in r and r[c].notna().any() else math.nan) for c in ("rank_index", "rank_index_rel")}
        rows.append({"target": cfg["target"], "M_U": mu, "M_L": ml, "strategy": cfg["strategy"], "lr": cfg["lr"],
                     "steps": cfg["steps"], "R(z_tar)": r["rank"].mean(), "rank1_rate": (r["rank"] == 1).mean(),
                     f"sim_top{k}[{encoder}]": r["sim_topk"].mean(), f"sim_bot{k}[{encoder}]": r["sim_botk"].mean(),
                     f"FD[{encoder}]": r["fd"].mean(), "R_rel": rel.mean(),
                     "rank1_rate_rel": (rel == 1).mean() if rel.notna().any() else math.nan,
                     "R_index": ix["rank_index"], "R_index_rel": ix["rank_index_rel"], "targets": len(r), "items": n})
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, out: Path, encoder: str, k: int, fd_original: float) -> None:
    atomic_write_text(out / "table1.csv", table.to_csv(index=False))
    lines = [f"Self-influence grid (Table 1). Similarities and FD use the `{encoder}` audio encoder "
             f"(the paper: CLAP and openl3); k = {k}; FD of the original checkpoint: {fd_original:.2f}.", "",
             "R rel / rank-1 rel: the same runs ranked by the relative score tau / s (RelatIF; not in the paper).", "",
             "| Target | M_U | M_L | lr | steps | R(z_tar) | rank-1 rate | R rel | rank-1 rel | sim top-k | sim bottom-k "
             "| FD |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in table.to_dict("records"):
        lines.append(f"| {d['target']} | {'✓' if d['M_U'] else ''} | {'✓' if d['M_L'] else ''} | {d['lr']:g} | "
                     f"{d['steps']} | {d['R(z_tar)']:.1f} | {d['rank1_rate']:.2f} | {d['R_rel']:.1f} | "
                     f"{d['rank1_rate_rel']:.2f} | {d[f'sim_top{k}[{encoder}]']:.3f} | "
                     f"{d[f'sim_bot{k}[{encoder}]']:.3f} | {d[f'FD[{encoder}]']:.2f} |")
    if table["R_index"].notna().any():
        lines += ["", "With the attribution index (`musicattr index`: first-order scores of the unlearned weights):",
                  "", "| Target | M_U | M_L | lr | steps | R(z_tar) | R index | R rel | R index rel |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in table[table["R_index"].notna()].to_dict("records"):
            lines.append(f"| {d['target']} | {'✓' if d['M_U'] else ''} | {'✓' if d['M_L'] else ''} | {d['lr']:g} | "
                         f"{d['steps']} | {d['R(z_tar)']:.1f} | {d['R_index']:.1f} | {d['R_rel']:.1f} | "
                         f"{d['R_index_rel']:.1f} |")
    atomic_write_text(out / "table1.md", "\n".join(lines) + "\n")
    log.info("\n".join(lines))

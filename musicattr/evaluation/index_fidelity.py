"""``musicattr index-fidelity``: fidelity of the attribution index to exact unlearning, measured on a run
(`make index-fidelity` on the demo).

    musicattr index-fidelity --config configs/demo/index-fidelity.yaml

1. builds the index at the largest k (`musicattr index`'s module in this process; resumable) in <out>/index;
2. queries: the first --generated prompts of <config_dir>/compare.yaml, generated as `musicattr compare`
   does, and --train training items evenly spaced over the store;
3. exact, per query: Eq. 2 (`musicattr unlearn`: K draws, M_U, all blocks, lr) then Eq. 1 over the store
   (`musicattr attribute --model.relative true`, T draws); reused when done before with the same settings;
4. psi of every query from its gradient and from its unlearned weights (as `musicattr query`);
5. the unprojected first-order product <phi_i, psi> for every item (one more per-item gradient pass);
6. the index scores at every k of --ks (folds of the largest sketch): Spearman and top-10 / top-100 overlap
   with exact Eq. 1 and with the exact relative score, averaged over the queries.

Writes <out>/fidelity.json (everything, per query), fidelity.md (the README's table) and k_curve.png.
T, seed, M_L, damping and target come from <config_dir>/index.yaml; lr and K from ``lr`` / ``num_draws``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import yaml

log = logging.getLogger(__name__)
ROUTES = {"gradient": "query gradient", "unlearned": "unlearned weights"}


def setting(args) -> dict:
    cfg = yaml.safe_load((Path(args.config_dir) / "index.yaml").read_text())["model"]
    return {k: cfg[k] for k in ("target", "damping", "num_draws", "seed", "mask_loss", "draws_per_forward")}


def build_index(args, s: dict, out: Path) -> float:
    """The index at the largest k; returns the seconds of the build (0 when it was complete already)."""
    import lightning as L

    from musicattr.attribution.index import INDEX_FILE, IndexModule
    from musicattr.data.datamodules import StorePredictDataModule

    record = out / "build.json"  # the seconds of the build that completed the index
    module = IndexModule(args.checkpoint, args.fisher, str(out / "index"), k=max(args.ks), write_caches=True, **s)
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1, logger=False,
                        use_distributed_sampler=False, inference_mode=False, enable_model_summary=False,
                        default_root_dir=str(out / "lightning"))
    fresh = not (out / "index" / INDEX_FILE).exists()
    resumed = fresh and any((out / "index" / "shards").glob("part-*"))
    t0 = time.perf_counter()
    trainer.predict(module, datamodule=StorePredictDataModule(args.store, 8))
    if fresh:
        record.write_text(json.dumps({"seconds": time.perf_counter() - t0, "resumed": resumed}))
    if not record.exists():
        return float("nan")
    seen = json.loads(record.read_text())
    if seen["resumed"]:
        log.warning("the index build was resumed after an interruption: its time covers part of the items")
    return seen["seconds"]


def queries_of(args, store, out: Path) -> list[dict]:
    """[{name, kind, query | query_item}]: generated queries (as compare) and evenly spaced training items."""
    from musicattr.attribution.query import folder_names
    from musicattr.evaluation.compare import generated_queries

    out_q = []
    if args.generated:
        cfg = yaml.safe_load((Path(args.config_dir) / "compare.yaml").read_text())
        prompts = cfg["prompts"][: args.generated]
        durations = (cfg.get("durations") or [None] * len(prompts))[: len(prompts)]
        infos = generated_queries(out / "generated", [{"prompt": p, "duration": d} for p, d in zip(prompts, durations)],
                                  args.checkpoint, store, args.gen_steps, 0)
        out_q += [{"id": i["query_id"], "kind": "generated", "query": str(out / "generated" /
                                                                            f"{i['query_id']}.query.safetensors")}
                  for i in infos]
    positions = np.linspace(0, len(store) - 1, args.train).round().astype(int) if args.train else []
    ids = [str(store.items["item_id"].iloc[p]) for p in positions]
    out_q += [{"id": i, "kind": "training", "query_item": i} for i in ids]
    for q, name in zip(out_q, folder_names([q["id"] for q in out_q])):
        q["name"] = name
    return out_q


def exact_scores(args, s: dict, q: dict, out: Path) -> tuple[pd.DataFrame, float]:
    """Eq. 2 then Eq. 1 (relative) for one query; returns the table and the seconds of the scoring pass."""
    from musicattr.attribution.unlearn import run_unlearn
    from musicattr.evaluation.common import score_store

    qdir = out / "queries" / q["name"]
    unlearned = str(qdir / "unlearned.safetensors")
    run_file, record = qdir / "exact" / "run.json", qdir / "exact_seconds.json"
    before = json.loads(run_file.read_text()) if run_file.exists() else None
    run_unlearn(args.checkpoint, args.fisher, unlearned, query=q.get("query"), query_item=q.get("query_item"),
                store=args.store, lr=args.lr, num_draws=args.num_draws, target=s["target"], strategy="mixed",
                damping=s["damping"], seed=0, reuse=True, device=args.device)
    t0 = time.perf_counter()
    trainer = {"accelerator": "gpu" if args.device.startswith("cuda") else "cpu", "devices": 1}
    table = score_store(args.checkpoint, args.store, unlearned, str(qdir / "exact"), s["num_draws"], s["seed"],
                        args.batch_size, trainer, mask_loss=s["mask_loss"], relative=True)
    seconds, key = time.perf_counter() - t0, json.loads(run_file.read_text())
    if before != key or not record.exists():  # computed now (not reused): its time is an exact pass's
        record.write_text(json.dumps({"seconds": seconds, "reused": before == key, "key": key}))
    seen = json.loads(record.read_text())
    return table, float("nan") if seen["reused"] else seen["seconds"]


def first_order(ctx, psis, s: dict, out: Path, key: dict, args) -> tuple[np.ndarray, np.ndarray]:
    """<phi_i, psi_q> unprojected for every item and query (cached in <out>/first_order.npz under ``key``)."""
    from musicattr.evaluation.fidelity import first_order_scores

    path, key_file = out / "first_order.npz", out / "first_order.json"
    if path.exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        data = np.load(path)
        return data["dots"], data["sensitivity"]
    t0 = time.perf_counter()
    dots, sens = first_order_scores(ctx.task, ctx.model, ctx.params, ctx.precond, ctx.store, psis, s["seed"], s["num_draws"],
                                    mask=s["mask_loss"], draws_per_forward=s["draws_per_forward"],
                                    progress=lambda i, n: log.info("  first-order pass: %d / %d items (%.0f s)", i, n,
                                                                   time.perf_counter() - t0))
    np.savez(path, dots=dots, sensitivity=sens)
    key_file.write_text(json.dumps(key))
    return dots, sens


def summarise(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    metrics = [c for c in df.columns if c.startswith(("eq1_", "rel_"))]
    return df.groupby(["route", "k"], sort=False)[metrics].mean().reset_index()


def markdown(mean: pd.DataFrame, n_queries: int, n_items: int) -> str:
    lines = [f"| scores | k | Spearman (Eq. 1) | top-10 (Eq. 1) | top-100 (Eq. 1) | Spearman (relative) | "
             f"top-10 (relative) | top-100 (relative) |", "|---|---|---|---|---|---|---|---|"]
    for r in mean.itertuples():
        label = f"{'first order, unprojected' if r.k == 'unprojected' else 'index'} (psi: {ROUTES[r.route]})"
        lines.append(f"| {label} | {r.k} | {r.eq1_spearman:.3f} | {r.eq1_top10:.1f} | {r.eq1_top100:.1f} | "
                     f"{r.rel_spearman:.3f} | {r.rel_top10:.1f} | {r.rel_top100:.1f} |")
    lines.append(f"\nMeans over {n_queries} queries; top-k overlaps out of k; {n_items} training items.")
    return "\n".join(lines)


def plot(mean: pd.DataFrame, ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "spearman", "Spearman with exact"), (axes[1], "top10", "top-10 overlap")):
        for route, colour, marker in (("gradient", "C0", "o"), ("unlearned", "C1", "x")):
            sub = mean[(mean["route"] == route) & (mean["k"] != "unprojected")]
            ref = mean[(mean["route"] == route) & (mean["k"] == "unprojected")]
            for kind, style in (("eq1", "-"), ("rel", "--")):
                ax.plot([int(k) for k in sub["k"]], sub[f"{kind}_{metric}"], style, color=colour, marker=marker,
                        label=f"{'Eq. 1' if kind == 'eq1' else 'relative'}, psi: {ROUTES[route]}")
                if len(ref):
                    ax.axhline(float(ref[f"{kind}_{metric}"].iloc[0]), color=colour, linestyle=style, alpha=0.35)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xlabel("sketch size k (faint lines: unprojected first order)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Attribution index vs exact unlearning (Eq. 1), mean over queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_index_fidelity(checkpoint: str, store: str, fisher: str, out: str, config_dir: str = "configs/demo",
                       ks: list[int] | None = None, generated: int = 8, train: int = 8, lr: float = 1e-6,
                       num_draws: int = 256, gen_steps: int = 50, batch_size: int = 16, device: str = "cpu") -> dict:
    """The index against exact unlearning on ``generated`` prompts of <config_dir>/compare.yaml and ``train``
    training items (see the module doc).

    Args:
        checkpoint, store, fisher: theta0, its latent store and its Fisher.
        out: the output folder (index, queries, fidelity.json, fidelity.md, k_curve.png); resumable.
        config_dir: index.yaml (T, seed, M_L, damping, target) and compare.yaml (the prompts).
        ks: sketch sizes, powers of two (the index is built at the largest; default 2^11 .. 2^15).
        lr, num_draws: Eq. 2 of the exact route and of the query gradient (K); gen_steps: sampler steps.
    """
    args = SimpleNamespace(checkpoint=checkpoint, store=store, fisher=fisher, config_dir=config_dir,
                           ks=list(ks or [2048, 4096, 8192, 16384, 32768]), generated=generated, train=train, lr=lr,
                           num_draws=num_draws, gen_steps=gen_steps, batch_size=batch_size, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from musicattr.attribution.query import open_query
    from musicattr.data.latent_store import LatentStore
    from musicattr.evaluation.fidelity import agreement

    s = setting(args)
    ks = sorted(args.ks)
    log.info("[1] index at k = %d (T = %d, target %s, damping %g)", ks[-1], s["num_draws"], s["target"], s["damping"])
    build_seconds = build_index(args, s, out)
    store = LatentStore(args.store)
    queries = queries_of(args, store, out)
    log.info("[2-3] %d queries: exact Eq. 2 + Eq. 1 (relative) for each", len(queries))
    exact, exact_seconds = {}, []
    for q in queries:
        exact[q["name"]], sec = exact_scores(args, s, q, out)
        exact_seconds.append(sec)
        log.info("  %s (%s): exact pass %.1f s", q["name"], q["kind"], sec)

    log.info("[4] psi from the query gradients and from the unlearned weights")
    ctx = open_query(str(out / "index"), args.checkpoint, args.fisher, args.store, device=args.device)
    psis, info = [], []
    for q in queries:
        for route in ROUTES:
            if route == "gradient":
                psi, i = ctx.from_query(q.get("query"), q.get("query_item"), lr=args.lr, num_draws=args.num_draws,
                                        seed=0, strategy="mixed", draws_per_forward=s["draws_per_forward"])
            else:
                psi, i = ctx.from_unlearned(str(out / "queries" / q["name"] / "unlearned.safetensors"))
            psis.append(psi)
            info.append({"name": q["name"], "kind": q["kind"], "route": route, "seconds": i["seconds"]})
    from musicattr.attribution.query import project

    projected = torch.stack([project(ctx.projection, psi) for psi in psis], 1)
    t0 = time.perf_counter()
    ctx.index.scores(projected)
    lookup_seconds = time.perf_counter() - t0

    log.info("[5] unprojected first order <phi_i, psi> (one per-item gradient pass)")
    key = {"index": ctx.index.provenance, "queries": [q["name"] for q in queries], "lr": args.lr,
           "num_draws": args.num_draws, "routes": list(ROUTES)}
    dots, sens = first_order(ctx, psis, s, out, key, args)

    log.info("[6] agreement with exact Eq. 1 at k = %s", ks)
    order = store.items["index"].astype(int).to_numpy()          # rows of dots: store order
    pos = {int(i): p for p, i in enumerate(ctx.index.items["index"].astype(int))}
    rows_of_index = np.array([pos[i] for i in order])            # index rows -> store order
    s_index = ctx.index.items["sensitivity"].to_numpy()[rows_of_index]
    by_k = {k: ctx.index.scores(projected, k=k)[rows_of_index] for k in ks}
    rows = []
    for c, i in enumerate(info):
        ex = exact[i["name"]].set_index("index").loc[order]
        exact_eq1, exact_rel = ex["score"].to_numpy(), ex["relative_score"].to_numpy()
        estimates = {"unprojected": dots[:, c], **{str(k): by_k[k][:, c] for k in ks}}
        for k, est in estimates.items():
            a, r = agreement(est, exact_eq1), agreement(est / s_index, exact_rel)
            rows.append({**i, "k": k, **{f"eq1_{m}": v for m, v in a.items()}, **{f"rel_{m}": v for m, v in r.items()}})
    mean = summarise(rows)
    by_kind = {kind: summarise([r for r in rows if r["kind"] == kind]).to_dict("records")
               for kind in ("generated", "training") if any(r["kind"] == kind for r in rows)}
    grad_seconds = float(np.mean([i["seconds"] for i in info if i["route"] == "gradient"]))
    exact_pass = float(np.nanmean(exact_seconds)) if np.isfinite(exact_seconds).any() else float("nan")
    timing = {"build_seconds": build_seconds, "exact_pass_seconds_mean": exact_pass,
              "query_gradient_seconds_mean": grad_seconds, "lookup_seconds_all_queries": lookup_seconds,
              "queries": len(psis), "items": len(store),
              "build_over_exact_pass": build_seconds / exact_pass,
              "query_over_exact_pass": (grad_seconds + lookup_seconds / len(psis)) / exact_pass,
              "sensitivity_max_relative_gap": float(np.max(np.abs(sens - s_index) / s_index))}
    result = {"settings": {**s, "lr": args.lr, "K": args.num_draws, "ks": ks, "checkpoint": args.checkpoint,
                           "store": args.store, "fisher": args.fisher},
              "mean": mean.to_dict("records"), "by_kind": by_kind, "per_query": rows, "timing": timing}
    (out / "fidelity.json").write_text(json.dumps(result, indent=2))
    md = markdown(mean, len(queries), len(store))
    (out / "fidelity.md").write_text(md + "\n")
    plot(mean, ks, out / "k_curve.png")
    log.info("\n%s\n", md)
    log.info("timing: build %.0f s = %.2f exact passes; a query (gradient %.1f s + lookup) = %.2f%% of an exact pass "
             "(%.1f s)", build_seconds, timing["build_over_exact_pass"], grad_seconds,
             100 * timing["query_over_exact_pass"], timing["exact_pass_seconds_mean"])
    log.info("wrote %s, %s, %s", out / "fidelity.json", out / "fidelity.md", out / "k_curve.png")
    return result

"""The campaign's tables: LDS and leave-K-out per query and per method, and one table for every method.

Writes under the campaign's out_dir: ``lds.csv`` / ``lds_per_query.csv``, ``leave_k_out.csv`` /
``leave_k_out_per_query.csv``, ``methods.csv`` / ``methods.md`` (every method on the same queries and
subsets), ``summary.json`` (the settings: M, alpha, K, Q, steps, seeds, and the measured times), and a wandb
table (offline unless WANDB_MODE says otherwise).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from musicattr.atomic import atomic_write_json, atomic_write_text
from musicattr.counterfactual import leave_k_out as lko_math
from musicattr.counterfactual.lds import lds_per_query, seed_noise

log = logging.getLogger(__name__)


def lds_tables(out: Path, c, measure, settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-query and per-method LDS with the seed-noise floor (see ``counterfactual.lds``)."""
    qids = [q.query_id for q in c.lds_queries]
    m = len(c.lds_kept)

    def losses(seed: int, subsets) -> np.ndarray:  # [Q, len(subsets)]
        cols = [measure.losses(c.run_dir(out, c.lds_runs[j, seed])) for j in subsets]
        return np.array([[col[q] for col in cols] for q in qids])

    loss = np.mean([losses(s, range(m)) for s in settings.seeds], axis=0)
    noise_j = range(min(settings.noise_subsets, m))
    if len(noise_j):
        noise = seed_noise(losses(settings.seeds[0], noise_j), losses(settings.noise_seed, noise_j), loss)
    else:  # no noise floor asked for
        noise = {k: np.full(len(qids), np.nan) for k in ("seed_std", "subset_std", "seed_lds")}
    rows = []
    for method, scores in c.lds_scores.items():
        for q, value in zip(c.lds_queries, lds_per_query(scores, c.lds_kept, loss)):
            rows.append({"query_id": q.query_id, "kind": q.kind, "method": method, "lds": value})
    per = pd.DataFrame(rows)
    floor = pd.DataFrame({"query_id": qids, **noise})
    per = per.merge(floor, on="query_id")
    summary = []
    for method, g in per.groupby("method", sort=False):
        row = {"method": method, "lds": g["lds"].mean(), "lds_se": g["lds"].std(ddof=1) / np.sqrt(len(g))
               if len(g) > 1 else np.nan, "queries": len(g), "subsets": m, "alpha": settings.alpha,
               "seeds": len(settings.seeds)}
        for kind, k in g.groupby("kind"):
            row[f"lds_{kind}"] = k["lds"].mean()
        row["noise_seed_lds"] = floor["seed_lds"].mean()
        row["noise_seed_std_over_subset_std"] = (floor["seed_std"] / floor["subset_std"]).mean()
        summary.append(row)
    return per, pd.DataFrame(summary)


def leave_k_out_tables(out: Path, c, measure, settings, theta0: dict[str, float]
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (query, method, seed) loss increases, and their summary per method (see ``counterfactual.leave_k_out``);
    ``theta0``: theta0's own query losses, for context."""
    rows = []
    for (qid, method, seed), r in c.lko_runs.items():
        ref = c.run_dir(out, c.lko_references[seed])
        run = c.run_dir(out, r)
        q = next(q for q in c.lko_queries if q.query_id == qid)
        rows.append({"query_id": qid, "kind": q.kind, "method": method, "seed": seed, "k": settings.k,
                     "loss": measure.losses(run)[qid], "reference_loss": measure.losses(ref)[qid],
                     "theta0_loss": theta0[qid], "chroma": measure.chroma(run).get(qid, np.nan),
                     "chroma_reference": measure.chroma(ref).get(qid, np.nan), "retrain": run.name,
                     "removed": ";".join(r.removed)})
    per = lko_math.with_increase(pd.DataFrame(rows))
    return per, lko_math.summarize(per)


def methods_table(*parts: pd.DataFrame) -> pd.DataFrame:
    """One row per method (in the order the parts name them): its LDS (with the noise floor) and its leave-K-out
    figures, side by side."""
    table = parts[0]
    for t in parts[1:]:
        table = table.merge(t, on="method", how="outer", suffixes=("", "_lko"))
    order = list(dict.fromkeys(m for t in parts for m in t["method"]))
    return table.set_index("method").loc[order].reset_index()


def _fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:{spec}}"


def methods_markdown(table: pd.DataFrame, header: str) -> str:
    lines = [header, "", "| method | LDS | ± s.e. | LDS generated | LDS planted | LDS training | top-K loss increase "
             "| ± over seeds | increase % | ratio to random-K | excess over random-K | wins over random-K "
             "| planted chroma (theta0') |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in table.to_dict("records"):
        chroma = f"{_fmt(d.get('planted_chroma'))} ({_fmt(d.get('planted_chroma_reference'))})" \
            if np.isfinite(d.get("planted_chroma", np.nan)) else "-"
        cells = [_fmt(d.get(k)) for k in ("lds", "lds_se", "lds_generated", "lds_planted", "lds_training")]
        cells += [_fmt(d.get(k), spec) for k, spec in (("increase", ".3g"), ("increase_seed_std", ".2g"),
                                                       ("increase_pct", ".3g"), ("ratio_to_random", ".2f"),
                                                       ("excess_over_random", ".3g"), ("wins_over_random", ".2f"))]
        lines.append(f"| {d['method']} | " + " | ".join(cells) + f" | {chroma} |")
    return "\n".join(lines) + "\n"


def describe_lds(c, lds, recipe) -> str:
    return (f"LDS: M = {len(c.lds_kept)} subsets at alpha = {lds.alpha}, seeds {lds.seeds}, Q = {len(c.lds_queries)} "
            f"queries; noise floor: the first {lds.noise_subsets} subsets retrained again with seed {lds.noise_seed}; "
            f"retrain recipe: {recipe.describe()}.")


def describe_lko(c, lko, recipe) -> str:
    return (f"Leave-K-out: K = {lko.k}, seeds {lko.seeds}, Q = {len(c.lko_queries)} queries; loss increase against "
            f"theta0' (the full store, same recipe and seed); retrain recipe: {recipe.describe()}.")


def write_report(out: Path, c, measure, theta0: dict[str, float], experiments, lds, lko, recipe,
                 use_wandb: bool) -> dict:
    """Write the tables of the experiments run, then the methods table over them and over the other experiment's
    last tables in ``out`` (``make lds`` then ``make leave-k-out`` fill one table; each part's header line says
    what it was measured with). Log the methods table and return the summary."""
    from musicattr.wandb_logger import open_wandb

    timing_files = [c.run_dir(out, r) / "timing.json" for r in c.plan]
    timings = [json.loads(p.read_text()) for p in timing_files if p.exists()]
    fits = [t["fit_s"] for t in timings if "fit_s" in t]
    references = [measure.losses(c.run_dir(out, r)) for r in c.lko_references.values()]
    summary = {"experiments": list(experiments), "recipe": recipe.describe(), "steps": recipe.steps,
               "retrains": len(c.plan), "queries": len(c.queries),
               "mean_fit_s": float(np.mean(fits)) if fits else None,
               "mean_measure_s": float(np.mean([t["measure_s"] for t in timings])) if timings else None,
               "mean_query_loss_theta0": float(np.mean(list(theta0.values()))),
               "mean_query_loss_theta0_prime": float(np.mean([v for r in references for v in r.values()]))
               if references else None}
    tables = {}
    if "lds" in experiments:
        per, tables["lds"] = lds_tables(out, c, measure, lds)
        atomic_write_text(out / "lds_per_query.csv", per.to_csv(index=False))
        floor = tables["lds"].iloc[0]
        _write_part(out, "lds", tables["lds"], describe_lds(c, lds, recipe) + (
            f" Seed-noise floor: seed-to-seed LDS {_fmt(floor['noise_seed_lds'])}, loss std over seeds / over "
            f"subsets {_fmt(floor['noise_seed_std_over_subset_std'], '.2f')}."), asdict(lds))
        summary["lds"] = tables["lds"].set_index("method")["lds"].to_dict()
        summary["lds_noise_seed_lds"] = float(tables["lds"]["noise_seed_lds"].iloc[0])
    if "leave-k-out" in experiments:
        per, tables["leave_k_out"] = leave_k_out_tables(out, c, measure, lko, theta0)
        atomic_write_text(out / "leave_k_out_per_query.csv", per.to_csv(index=False))
        _write_part(out, "leave_k_out", tables["leave_k_out"], describe_lko(c, lko, recipe), asdict(lko))
        summary["ratio_to_random"] = tables["leave_k_out"].set_index("method")["ratio_to_random"].to_dict()
    parts = {name: _read_part(out, name) for name in ("lds", "leave_k_out")}
    parts = {name: part for name, part in parts.items() if part is not None}
    table = methods_table(*(part[0] for part in parts.values()))
    header = "Counterfactual validation. " + " ".join(part[1] for part in parts.values())
    markdown = methods_markdown(table, header)
    atomic_write_text(out / "methods.csv", table.to_csv(index=False))
    atomic_write_text(out / "methods.md", markdown)
    atomic_write_json(out / "summary.json", summary)
    log.info("%s", markdown)
    run = open_wandb("counterfactual", {k: v for k, v in summary.items() if not isinstance(v, dict)}, use_wandb)
    if run is not None:
        import wandb

        run.log({"methods": wandb.Table(dataframe=table),
                 **{name: wandb.Table(dataframe=t) for name, t in tables.items()}})
        run.finish()
    return summary


def _write_part(out: Path, name: str, table: pd.DataFrame, description: str, settings: dict) -> None:
    atomic_write_text(out / f"{name}.csv", table.to_csv(index=False))
    atomic_write_json(out / f"{name}.json", {"description": description, "settings": settings})


def _read_part(out: Path, name: str) -> tuple[pd.DataFrame, str] | None:
    if not (out / f"{name}.csv").exists() or not (out / f"{name}.json").exists():
        return None
    return pd.read_csv(out / f"{name}.csv"), json.loads((out / f"{name}.json").read_text())["description"]

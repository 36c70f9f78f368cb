"""``musicattr adherence``: does the model model music, and do its generations follow the prompt?

Attribution of a generation is only worth reading when the model generates what it was asked for, so
this stage measures it before anything is attributed:

* planted regeneration: for each planted group (a track the corpus duplicated), generate from its
  caption and duration, and compare the 12-bin chroma of the generation with every training track
  (``models.health.chroma_similarity``, time-aligned). The tune counts as regenerated when the best
  copy of the planted track is closer than ``percentile`` (0.95) of the other training tracks.
* group adherence: prompts that name a value of a metadata column (an instrument, a composer or
  collection) are generated; each generation is assigned to the nearest group centroid of the training
  tracks' audio embeddings (cosine, the evaluation's audio encoder); accuracy against chance 1/G, with
  the one-sided binomial p-value. Different prompts giving measurably different audio is what an
  accuracy above chance shows.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musicattr.atomic import atomic_write_json, atomic_write_text
from musicattr.attribution.similarity import store_audio_embeddings
from musicattr.data.latent_store import LatentStore
from musicattr.evaluation.common import planted_groups, read_metadata_rows, store_folder
from musicattr.wandb_logger import open_wandb

log = logging.getLogger(__name__)


def planted_regeneration(generated: np.ndarray, sample_rate: int, members: set[str],
                         train_chroma: dict[str, np.ndarray]) -> dict[str, Any]:
    """Chroma similarity of a generation to the best planted copy, and the share of the other training
    tracks it beats (the planted percentile)."""
    from musicattr.models.health import chroma, chroma_similarity

    q = chroma(generated, sample_rate)
    sims = {f: chroma_similarity(q, c) for f, c in train_chroma.items()}
    planted = max(sims[f] for f in members if f in sims)
    others = np.array([s for f, s in sims.items() if f not in members])
    order = sorted(sims, key=lambda f: -sims[f])
    return {"chroma_to_planted": planted, "planted_percentile": float((others < planted).mean()),
            "planted_rank": min(order.index(f) for f in members if f in sims) + 1,
            "nearest_other": next(f for f in order if f not in members),
            "nearest_other_chroma": float(others.max())}


def nearest_centroid_accuracy(embeddings: torch.Tensor, labels: list[str], centroids: dict[str, torch.Tensor]
                              ) -> tuple[float, list[str]]:
    """Accuracy of assigning each L2-normalised embedding [Q, D] to its nearest centroid (cosine)."""
    names = list(centroids)
    cent = F.normalize(torch.stack([centroids[n] for n in names]), dim=1)
    pred = [names[i] for i in (F.normalize(embeddings, dim=1) @ cent.T).argmax(1).tolist()]
    return float(np.mean([p == t for p, t in zip(pred, labels)])), pred


def binomial_p_value(hits: int, n: int, chance: float) -> float:
    """One-sided P(X >= hits) for X ~ Binomial(n, chance)."""
    from scipy.stats import binomtest

    return float(binomtest(hits, n, chance, alternative="greater").pvalue) if n else 1.0


def run_adherence(checkpoint: str, store: str, out_dir: str, prompts: dict[str, dict[str, list[str]]] | None = None,
                  duration: float = 8.0, include_planted: bool = True, percentile: float = 0.95,
                  audio_encoder: str = "aisfx", audio_encoder_checkpoint: str | None = None, gen_steps: int = 50,
                  cfg_scale: float = 5.0, seed: int = 0, use_wandb: bool = True) -> dict:
    """Generate and measure as the module docstring says; write ``adherence.json``, ``adherence.md`` and the audio.

    Args:
        prompts: metadata column -> {value: [prompts naming that value]} (e.g. instrument -> piano -> [...]).
            Groups are the training tracks whose ``column`` equals the value (from the audio folder's metadata).
        duration: seconds of each group-prompt generation (capped at the model's length).
        include_planted: also regenerate the planted tracks (corpus ``planted_group`` metadata).
        percentile: a planted tune is regenerated when it beats this share of the other training tracks.
        audio_encoder: embeddings of the group check ('aisfx' offline; 'clap' with a checkpoint).
    """
    from musicattr.embeddings.audio import build_audio_encoder, load_audio
    from musicattr.embeddings.text import build_text_encoder
    from musicattr.models.autoencoder_module import store_autoencoder
    from musicattr.models.diffusion_module import load_diffusion_module
    from musicattr.models.generate import sample_latents, write_generation
    from musicattr.models.health import chroma

    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    s = LatentStore(store)
    m = s.manifest
    module = load_diffusion_module(checkpoint)
    ae = store_autoencoder(m)
    text = build_text_encoder(m.get("text_encoder", "minilm"))
    sr, frames = int(m["sample_rate"]), int(m["max_frames"])
    max_s = frames * int(m["downsampling_ratio"]) / sr
    meta = read_metadata_rows(s)
    folder = store_folder(s)

    def generate(prompt: str, seconds: float, k: int, name: str) -> np.ndarray:
        seconds = min(seconds, max_s)
        z = sample_latents(module, text.encode([prompt]), math.ceil(seconds), frames, gen_steps, cfg_scale, seed + k)
        y = ae.decode(z)[0, :1, : int(seconds * sr)].cpu()
        write_generation(out / "audio" / f"{name}.wav", y, sr)
        return y[0].numpy()

    report: dict[str, Any] = {"checkpoint": checkpoint, "store": store, "audio_encoder": audio_encoder,
                              "gen_steps": gen_steps, "cfg_scale": cfg_scale, "seed": seed}
    planted_rows = []
    groups = {}
    for f, original in (planted_groups(s).items() if include_planted else ()):
        groups.setdefault(original, set()).add(f)
    if groups:
        limit = int(max_s * sr)
        train_chroma = {r.file_name: chroma(load_audio(str(folder / r.file_name))[0].mean(0).numpy()[:limit], sr)
                        for r in s.items.itertuples()}
        for k, (original, members) in enumerate(sorted(groups.items())):
            row = meta[original]
            y = generate(row["caption"], float(row["duration_s"]), k, f"planted_{k}")
            res = planted_regeneration(y, sr, members, train_chroma)
            planted_rows.append({"planted_group": original, "caption": row["caption"], **res,
                                 "regenerated": res["planted_percentile"] >= percentile})
            log.info("planted %s: chroma %.3f to the planted track, beats %.1f%% of the others (rank %d)",
                     original, res["chroma_to_planted"], 100 * res["planted_percentile"], res["planted_rank"])
        report["planted"] = planted_rows
        report["planted_regenerated"] = int(sum(r["regenerated"] for r in planted_rows))
        report["planted_groups"] = len(planted_rows)
    group_rows = {}
    if prompts:
        encoder = build_audio_encoder(audio_encoder, audio_encoder_checkpoint)
        emb = store_audio_embeddings(s, encoder)
        means = F.normalize(emb.track_means(), dim=1)
        files = list(s.items["file_name"])
        for column, by_value in prompts.items():
            centroids, labels, gen = {}, [], []
            for value in by_value:
                idx = [i for i, f in enumerate(files) if str(meta.get(f, {}).get(column)) == str(value)]
                if not idx:
                    raise ValueError(f"no training track has {column} = {value!r} in {folder}/metadata.jsonl; "
                                     f"fix: name values of the column that occur in the training set")
                centroids[value] = means[idx].mean(0)
            for value, texts in by_value.items():
                for j, p in enumerate(texts):
                    y = generate(p, duration, 100 + len(gen), f"{column}_{value}_{j}")
                    gen.append(encoder.embed_track(torch.from_numpy(y)[None], sr))
                    labels.append(value)
            acc, pred = nearest_centroid_accuracy(torch.stack(gen), labels, centroids)
            chance = 1.0 / len(centroids)
            hits = int(round(acc * len(labels)))
            group_rows[column] = {"accuracy": acc, "chance": chance, "prompts": len(labels), "groups": len(centroids),
                                  "p_value": binomial_p_value(hits, len(labels), chance),
                                  "predictions": [{"value": t, "predicted": p} for t, p in zip(labels, pred)]}
            log.info("%s prompts: nearest-centroid accuracy %.2f (chance %.2f, p = %.3g)", column, acc, chance,
                     group_rows[column]["p_value"])
        report["groups"] = group_rows
    atomic_write_json(out / "adherence.json", report)
    atomic_write_text(out / "adherence.md", adherence_markdown(report))
    print(adherence_markdown(report))
    _dashboard(out, report, use_wandb)
    return report


def adherence_markdown(report: dict) -> str:
    lines = [f"Prompt adherence of `{report['checkpoint']}` ({report['gen_steps']} sampler steps, "
             f"cfg {report['cfg_scale']}).", ""]
    if report.get("planted"):
        lines += [f"Planted tunes regenerated (beating >= 95% of the other training tracks by chroma): "
                  f"{report['planted_regenerated']} / {report['planted_groups']}", "",
                  "| planted track | chroma to it | beats | rank | nearest other (chroma) |", "|---|---|---|---|---|"]
        for r in report["planted"]:
            lines.append(f"| {r['planted_group']} | {r['chroma_to_planted']:.3f} | {100 * r['planted_percentile']:.1f}% "
                         f"| {r['planted_rank']} | {r['nearest_other']} ({r['nearest_other_chroma']:.3f}) |")
        lines.append("")
    if report.get("groups"):
        lines += [f"Group prompts, nearest group centroid of `{report['audio_encoder']}` embeddings:", "",
                  "| column | groups | prompts | accuracy | chance | p (binomial) |", "|---|---|---|---|---|---|"]
        for col, g in report["groups"].items():
            lines.append(f"| {col} | {g['groups']} | {g['prompts']} | {g['accuracy']:.2f} | {g['chance']:.2f} "
                         f"| {g['p_value']:.2g} |")
    return "\n".join(lines) + "\n"


def _dashboard(out: Path, report: dict, enabled: bool) -> None:
    run = open_wandb("adherence", {k: v for k, v in report.items() if not isinstance(v, (list, dict))}, enabled)
    if run is None:
        return
    import wandb

    rows = [[r["caption"], wandb.Audio(str(out / "audio" / f"planted_{k}.wav")), r["chroma_to_planted"],
             r["planted_percentile"]] for k, r in enumerate(report.get("planted", []))]
    run.log({"planted": wandb.Table(columns=["caption", "generated", "chroma", "percentile"], data=rows),
             **{f"{c}/accuracy": g["accuracy"] for c, g in report.get("groups", {}).items()}})
    run.finish()

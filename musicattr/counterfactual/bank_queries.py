"""The bank's queries: generated once by the benchmark model theta0' (as ``musicattr compare`` generates them), grown
in batches, and the key of their losses.

A later batch's prompts are appended to ``prompts``: its queries are generated with ids and sampler seeds
continuing from the last query, their rows appended to queries.csv (the earlier rows never change) and their ids
listed in generation-<b>.json. Every loss a record holds is keyed by ``loss_key`` (the queries' table hash, T,
seed, M_L, task); a record made before a batch was appended names that prefix of the table (``covered_queries``),
and ``backfill_losses`` measures the new queries on every retrain whose weights are still here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from musicattr.atomic import atomic_path, atomic_write_json, atomic_write_text
from musicattr.counterfactual.bank_layout import (BENCHMARK_MODEL, QUERIES, BankError, compare_generation,
                                                  file_fingerprint_at, machine_info, measure_queries, planted_copies,
                                                  store_metadata)
from musicattr.counterfactual.queries import Query
from musicattr.counterfactual.retrain import MODEL

log = logging.getLogger(__name__)


def read_queries_table(root: Path) -> pd.DataFrame:
    """queries.csv of the bank at ``root``: one row per query (id, kind, prompt, duration, planted group, training
    item, attributes, the latent file's fingerprint), in the order the batches were appended."""
    path = Path(root) / QUERIES / "queries.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the bank has no queries yet; fix: run `make bank` (it "
                                "generates them once the benchmark model exists)")
    return pd.read_csv(path, dtype={"query_id": str, "query_item": str, "planted_group": str})


def bank_queries(root: Path, table: pd.DataFrame) -> list[Query]:
    """The bank's queries as the counterfactual ``Query`` records (latents in ``root/queries``)."""
    out = []
    for r in table.to_dict("records"):
        item = r.get("query_item")
        item = None if item is None or (isinstance(item, float) and math.isnan(item)) or item == "" else str(item)
        planted = r.get("planted_group")
        planted = None if planted is None or (isinstance(planted, float) and math.isnan(planted)) else str(planted)
        qid = str(r["query_id"])
        if r["kind"] == "training":
            out.append(Query(qid, "training", str(r["prompt"]), item_id=item))
        else:
            out.append(Query(qid, str(r["kind"]), str(r["prompt"]),
                             query_file=str(Path(root) / QUERIES / f"{qid}.query.safetensors"),
                             planted_group=planted))
    return out


def table_hash(table: pd.DataFrame) -> str:
    """The queries' content: their table (with each latent file's fingerprint)."""
    return hashlib.blake2b(table.to_csv(index=False).encode(), digest_size=8).hexdigest()


def loss_key(table: pd.DataFrame, num_draws: int, seed: int, mask: bool, task) -> dict:
    """What every query loss of the bank depends on besides theta: the queries' content (their table and
    latent files), T, the seed, M_L, the draw namespace and the task."""
    from musicattr.attribution.loss import COUNTERFACTUAL

    return {"queries": table_hash(table),
            "num_draws": int(num_draws), "seed": int(seed), "mask_loss": bool(mask), "namespace": COUNTERFACTUAL,
            **task.identity()}


def generation_file(root: Path, batch: int) -> Path:
    """The generation settings of a batch of the bank's queries: generation.json for the first, generation-<b>.json
    (with the batch's ``query_ids``) for a later one."""
    return Path(root) / QUERIES / ("generation.json" if batch == 0 else f"generation-{batch}.json")


def _batch_number(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def query_batch_ends(root: Path, table: pd.DataFrame) -> list[int]:
    """The row counts of queries.csv after each batch of queries: [46] for a bank with one batch, [46, 106]
    once 60 queries were appended (generation-<b>.json lists each later batch's ids)."""
    later = [json.loads(p.read_text())["query_ids"]
             for p in sorted(Path(root, QUERIES).glob("generation-*.json"), key=_batch_number)]
    ends = [len(table)]
    for ids in reversed(later):
        ends.insert(0, ends[0] - len(ids))
    got = list(table["query_id"])
    for b, ids in enumerate(later):
        if got[ends[b]:ends[b + 1]] != list(ids):
            raise BankError(f"{Path(root, QUERIES)}: queries.csv does not end with the ids of generation-{b + 1}.json; "
                            "fix: restore the bank's queries from git (batches are appended, never reordered)")
    return ends


def earlier_batches(root: Path, table: pd.DataFrame) -> dict[str, list[str]]:
    """The content hash of queries.csv as it stood after each earlier batch -> the query ids it held (what a
    record measured before a later batch was appended names in its key)."""
    return {table_hash(table.iloc[:end]): list(table["query_id"][:end]) for end in query_batch_ends(root, table)[:-1]}


def covered_queries(table: pd.DataFrame, earlier: dict[str, list[str]], key: dict | None,
                    record_key: dict | None) -> list[str] | None:
    """The query ids whose losses a record measured with ``record_key`` holds under the bank's ``key``: every
    query if the keys are equal, the first batches' if the record's key names that prefix of the table
    (``earlier``: ``earlier_batches``; it was made before a later batch was appended), None if it was measured
    otherwise (left out)."""
    if key is None or record_key == key:
        return list(table["query_id"])
    if record_key is None or {k: v for k, v in record_key.items() if k != "queries"} != \
            {k: v for k, v in key.items() if k != "queries"}:
        return None
    return earlier.get(record_key["queries"])


def training_query_items(item_ids: list[str], excluded: set[str], n: int, seed: int) -> list[str]:
    """n training items as sanity queries, drawn with ``seed`` among the items not in ``excluded`` (the planted
    tracks: their duplicates would make the query trivial)."""
    eligible = [i for i in item_ids if i not in excluded]
    rng = np.random.default_rng([seed, 0x7A1])
    return [eligible[i] for i in sorted(rng.choice(len(eligible), min(n, len(eligible)), replace=False))]


def _check_prompt_lists(prompts: list, durations: list, attributes: list) -> None:
    if len(durations) != len(prompts) or len(attributes) != len(prompts):
        raise BankError(f"{len(prompts)} prompts, {len(durations)} durations and {len(attributes)} prompt_attributes; "
                        "fix: give one duration and one attribute mapping per prompt")


def make_queries(bank_root: Path, work_dir: Path, model: Path, store, prompts: list[str], durations: list[float],
                 attributes: list[dict], include_planted: bool, training_queries: int, gen_steps: int, seed: int,
                 match_columns: list[str]) -> pd.DataFrame:
    """Generate the queries with the benchmark model exactly as ``musicattr compare`` does (its
    ``generated_queries``: the prompts, then the planted captions; ids q000...), add ``training_queries``
    training items (ids t000...), and copy them into ``bank_root/queries``: the latents and text embeddings,
    the audio as FLAC (lossless), compare's generation settings, and queries.csv."""
    generated_queries, planted_queries = compare_generation()
    _check_prompt_lists(prompts, durations, attributes)
    meta = store_metadata(store)
    queries = [{"prompt": p, "duration": float(d), "planted_group": None, "attributes": dict(a or {})}
               for p, d, a in zip(prompts, durations, attributes)]
    if include_planted:
        queries += planted_queries(store, meta, list(match_columns))
    gen_dir = Path(work_dir) / "generated"
    infos = generated_queries(gen_dir, queries, str(model), store, gen_steps, seed)
    out = Path(bank_root) / QUERIES
    tmp = out.with_name("queries.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = []
    for q, info in zip(queries, infos, strict=True):
        rows.append({"query_id": info["query_id"], "kind": "planted" if q["planted_group"] else "generated",
                     "prompt": q["prompt"], "duration_s": info["duration_s"], "planted_group": q["planted_group"],
                     "query_item": None, "attributes": json.dumps(q.get("attributes") or {}, sort_keys=True),
                     "fingerprint": _ship_query(gen_dir, tmp, info)})
    ids = list(store.items["item_id"].astype(str))
    groups = planted_copies(store)
    planted = set(groups) | set(groups.values())
    files = dict(zip(store.items["file_name"], ids))
    for j, item in enumerate(training_query_items(ids, {files[f] for f in planted if f in files}, training_queries,
                                                  seed)):
        r = store.items.iloc[store.position_of(item)]
        rows.append({"query_id": f"t{j:03d}", "kind": "training", "prompt": r["caption"],
                     "duration_s": float(r["duration_s"]), "planted_group": None, "query_item": item,
                     "attributes": "{}", "fingerprint": f"item:{item}"})
    shutil.copyfile(gen_dir / "settings.json", tmp / "generation.json")
    table = pd.DataFrame(rows)
    atomic_write_text(tmp / "queries.csv", table.to_csv(index=False))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("bank: %d queries (%s) in %s", len(table), ", ".join(f"{n} {k}" for k, n in
                                                                  table["kind"].value_counts().items()), out)
    return table


def _ship_query(gen_dir: Path, out: Path, info: dict) -> str:
    """Copy a generated query's latent file and its audio (as 16-bit FLAC, lossless) from compare's ``gen_dir``
    into ``out``, each file written whole or not at all; returns the latent file's fingerprint."""
    import soundfile as sf

    qid = info["query_id"]
    with atomic_path(out / f"{qid}.query.safetensors") as tmp:
        shutil.copyfile(gen_dir / f"{qid}.query.safetensors", tmp)
    audio, sr = sf.read(str(gen_dir / info["audio"]), dtype="int16", always_2d=True)
    with atomic_path(out / f"{qid}.flac") as tmp:
        sf.write(str(tmp), audio, sr, subtype="PCM_16", format="FLAC")
    return file_fingerprint_at(out / f"{qid}.query.safetensors")


def grow_queries(bank_root: Path, work_dir: Path, model: Path, store, prompts: list[str], durations: list[float],
                 attributes: list[dict], gen_steps: int, seed: int) -> pd.DataFrame | None:
    """Append the queries of the prompts beyond those the bank was generated from (a later batch; None if
    there are none): generated by the benchmark model as compare does, numbered and seeded on from the last
    query (``first_id``), the latents, FLAC audio and generation-<b>.json copied into ``bank_root/queries``,
    their rows appended to queries.csv (the earlier rows unchanged)."""
    generated_queries, _ = compare_generation()
    root = Path(bank_root)
    table = read_queries_table(root)
    have = list(table.loc[table["kind"] == "generated", "prompt"])
    if len(prompts) < len(have) or [str(p) for p in prompts[:len(have)]] != have:
        raise BankError(f"{root / 'queries' / 'queries.csv'}: the bank's queries were generated from {len(have)} "
                        f"prompts that are not the first {len(have)} of this run's prompts ({len(prompts)}); fix: keep "
                        "the bank's prompts in their order and append new ones at the end")
    new = list(range(len(have), len(prompts)))
    if not new:
        return None
    _check_prompt_lists(prompts, durations, attributes)
    batch = 1 + len(list((root / QUERIES).glob("generation-*.json")))
    first = 1 + max(int(q[1:]) for q in table["query_id"] if str(q).startswith("q"))
    gen_dir = Path(work_dir) / f"generated-{batch}"
    infos = generated_queries(gen_dir, [{"prompt": prompts[j], "duration": float(durations[j])} for j in new],
                              str(model), store, gen_steps, seed, first_id=first)
    out = root / QUERIES
    rows = [{"query_id": info["query_id"], "kind": "generated", "prompt": prompts[j], "duration_s": info["duration_s"],
             "planted_group": None, "query_item": None, "attributes": json.dumps(attributes[j] or {}, sort_keys=True),
             "fingerprint": _ship_query(gen_dir, out, info)} for j, info in zip(new, infos, strict=True)]
    settings = json.loads((gen_dir / "settings.json").read_text())
    atomic_write_json(generation_file(root, batch), {**settings, "query_ids": [r["query_id"] for r in rows]})
    grown = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    atomic_write_text(out / "queries.csv", grown.to_csv(index=False))
    log.info("bank: query batch %d: %d queries (%s to %s) appended to %s", batch, len(rows), rows[0]["query_id"],
             rows[-1]["query_id"], out / "queries.csv")
    return read_queries_table(root)


def backfill_losses(root: Path, work: Path, first_name: str, task, queries: list[Query], store: str, seed: int,
                    loss_draws: int, mask: bool, device: str, key: dict) -> dict:
    """Measure the queries a record lacks (a later batch) on its retrained weights, where they are still here
    (``work_dir``; the benchmark model's in the bank), and give the record the bank's current key. Returns how
    many records were completed and how many stay with the earlier batches only (their weights are gone)."""
    done, gone = 0, 0
    for path in sorted((root / "retrains").glob("*.json")):
        rec = json.loads(path.read_text())
        missing = [q for q in queries if q.query_id not in rec["losses"]]
        if not missing:
            continue
        model = root / BENCHMARK_MODEL if rec["name"] == first_name else work / "retrains" / rec["name"] / MODEL
        if not model.exists() or file_fingerprint_at(model) != rec.get("model_fingerprint"):
            gone += 1
            continue
        t1 = time.time()
        rec["losses"].update(measure_queries(task, model, missing, store, seed, loss_draws, mask, device))
        rec["loss_key"] = key
        rec.setdefault("backfilled", []).append({"queries": [q.query_id for q in missing], "measure_s": time.time() - t1,
                                                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                 "machine": machine_info()})
        atomic_write_json(path, rec)
        done += 1
        log.info("bank: %s: %d more query losses (%.0f s)", rec["name"], len(missing), time.time() - t1)
    if done or gone:
        log.info("bank: later query batches: %d records completed, %d keep the earlier batches' losses only (their "
                 "retrained weights are not in %s)", done, gone, work / "retrains")
    return {"completed": done, "without_weights": gone}

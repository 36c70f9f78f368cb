"""Every method's scores for the bank's queries, shipped beside the bank, so that ``musicattr benchmark`` checks
them against it in minutes on a fresh clone (no Fisher, index, compare run or peers to compute first).

    <bank>/scores/<method>.parquet   tau_m(q, i): one row per training item (``item_id``), one column per query id
    <bank>/scores/manifest.json      the benchmark model's and the queries' fingerprints the scores were made on,
                                     the compare runs they came from, each method's file, and its provenance: per
                                     method, which export (compare run, time) each of its query columns came from

Written by ``musicattr benchmark --export_scores true`` from a checked compare run; read with ``--scores
<bank>/scores``, which refuses files made on another benchmark model or other query latents.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from musicattr.atomic import atomic_path, atomic_write_json
from musicattr.fingerprint import file_fingerprint, settings_key

log = logging.getLogger(__name__)
FOLDER, MANIFEST = "scores", "manifest.json"
FORMAT = 2          # 2: per-method provenance; a format-1 manifest is read, and gains it at its next export
UNRECORDED = "not recorded per method: source = every compare run of the folder, made = its last export's time"


def _file_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", method).strip("_") + ".parquet"


def _query_fingerprints(bank) -> dict[str, str | None]:
    table = bank.queries_table()
    return {r["query_id"]: (None if pd.isna(r.get("fingerprint")) else str(r["fingerprint"]))
            for r in table.to_dict("records")}


def _columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [c for c in pq.read_schema(path).names if c != "item_id"]


def _provenance(old: dict | None, folder: Path) -> dict[str, list[dict]]:
    """Per method, the exports its columns came from: [{source, made, queries}]; a format-1 manifest (none
    recorded) gives each method one entry with the folder's sources, time and a note saying so."""
    if old is None:
        return {}
    if "provenance" in old:
        return {m: [dict(e) for e in v] for m, v in old["provenance"].items()}
    return {name: [{"source": old.get("source"), "made": old.get("made"), "queries": _columns(folder / f),
                    "note": UNRECORDED}]
            for name, f in old["methods"].items() if (folder / f).exists()}


def provenance(folder: str | Path) -> dict[str, list[dict]]:
    """Which export (compare run, time) each method's shipped query columns came from (see ``export_scores``)."""
    path = Path(folder) / MANIFEST
    return _provenance(json.loads(path.read_text()), Path(folder)) if path.exists() else {}


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def describe_provenance(folder: str | Path, names: list[str], qids: list[str]) -> str:
    """Markdown lines: for each of ``names``, how many of ``qids`` each export gave it, from where and when, with
    the settings that differ where its columns were scored with more than one recorded setting."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else None
    known = (manifest or {}).get("settings", {})
    prov, want = _provenance(manifest, Path(folder)), set(qids)
    lines = []
    for name in names:
        used = []
        for e in prov.get(name, []):
            got = [q for q in e["queries"] if q in want]
            if got:
                used.append(e.get("settings"))
                lines.append(f"- {name}: {len(got)} queries ({got[0]} to {got[-1]}) from {e['source']}, {e['made']}"
                             + (f", settings {e['settings']}" if e.get("settings") else "")
                             + (f" ({e['note']})" if e.get("note") else ""))
        keys = sorted({k for k in used if k})
        if len(keys) > 1:
            flats = [_flat(known.get(k)) for k in keys]
            differ = sorted({f for d in flats for f in d if len({str(x.get(f)) for x in flats}) > 1})
            lines.append(f"- **{name}: its columns here were scored with {len(keys)} different settings** (differing: "
                         f"{', '.join(differ[:8])}{', ...' if len(differ) > 8 else ''})")
    return "\n".join(lines)


def export_scores(bank, scores: dict[str, np.ndarray], qids: list[str], source: str, out: str | Path | None = None,
                  settings: dict[str, list[dict | None]] | None = None) -> Path:
    """Write ``scores`` (method -> [Q, N] in ``qids`` x the bank's item order; a NaN row: no score for that
    query) with their provenance, merged into the folder's scores on the same benchmark model (a later batch of
    queries adds its columns; a query scored again replaces its column). ``settings``: per method, each query's
    table settings (its ``settings.json``; None where there is none), kept once in the manifest under their key;
    an export whose queries were scored with different settings gives one provenance entry per settings."""
    folder = Path(out) if out else bank.root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    model = file_fingerprint(str(bank.model))
    old = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).exists() else None
    if old is not None and old["model_fingerprint"] != model:
        old = None                                       # scores of another benchmark model: replaced
    files = dict(old["methods"]) if old else {}
    have = _query_fingerprints(bank)
    queries = {q: fp for q, fp in (old["queries"] if old else {}).items() if have.get(q) == fp}
    prov = _provenance(old, folder)
    known = dict((old or {}).get("settings") or {})
    made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, v in scores.items():
        v = np.asarray(v, np.float64)
        keep = [j for j, q in enumerate(qids) if np.isfinite(v[j]).all()]
        df = pd.DataFrame(v[keep].T, columns=[qids[j] for j in keep])
        if name in files and (folder / files[name]).exists():
            prev = pd.read_parquet(folder / files[name]).set_index("item_id").loc[bank.item_ids]
            prev = prev[[q for q in prev.columns if q in queries and q not in df.columns]]
            df = pd.concat([prev.reset_index(drop=True), df], axis=1)
        df = df[sorted(df.columns)]
        df.insert(0, "item_id", bank.item_ids)
        with atomic_path(folder / _file_name(name)) as tmp:
            df.to_parquet(tmp, index=False)
        files[name] = _file_name(name)
        queries.update({qids[j]: have.get(qids[j]) for j in keep})
        new = {qids[j] for j in keep}
        older = [dict(e, queries=[q for q in e["queries"] if q not in new]) for e in prov.get(name, [])]
        groups: dict[str | None, list[str]] = {}
        for j in keep:
            got = (settings or {}).get(name, [None] * len(qids))[j]
            key = None if got is None else settings_key(got)
            if key is not None:
                known[key] = got
            groups.setdefault(key, []).append(qids[j])
        prov[name] = older + [{"source": str(source), "made": made, "queries": qs, **({"settings": key} if key else {})}
                              for key, qs in groups.items()]
    for name in prov:                                    # columns of other latents were dropped above
        prov[name] = [e for e in (dict(e, queries=[q for q in e["queries"] if q in queries]) for e in prov[name])
                      if e["queries"]]
    sources = [x for x in str((old or {}).get("source") or "").split("; ") if x]
    sources += [] if str(source) in sources else [str(source)]             # each run once, in the order first used
    prov = {name: prov[name] for name in sorted(prov) if name in files}
    used = {e.get("settings") for v in prov.values() for e in v}
    atomic_write_json(folder / MANIFEST, {
        "format": FORMAT, "model_fingerprint": model, "queries": dict(sorted(queries.items())),
        "source": "; ".join(sources), "made": made, "methods": files, "provenance": prov,
        "settings": {k: known[k] for k in sorted(known) if k in used}})
    log.info("benchmark: %d methods' scores for %d queries written to %s", len(scores), len(qids), folder)
    return folder


def shipped_queries(folder: str | Path) -> set[str]:
    """The query ids the shipped scores cover, by any method (a later batch of the bank's queries may not be
    scored yet, or only by some methods: ``read_shipped`` gives NaN rows where a method has no column)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no shipped scores there; fix: point --scores at the bank's "
                                "scores folder (<bank>/scores), or write it with --export_scores true")
    return set(json.loads(path.read_text())["queries"])


def read_shipped(bank, folder: str | Path, names: list[str], qids: list[str]) -> dict[str, np.ndarray]:
    """The shipped scores [Q, N] of each of ``names`` that the folder holds (the others are left out with a log
    line); refuses scores made on another benchmark model or other query latents."""
    from musicattr.counterfactual.bank_layout import BankError

    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no shipped scores there; fix: point --scores at the bank's "
                                f"scores folder ({bank.root / FOLDER}), or write it with --export_scores true")
    manifest = json.loads(path.read_text())
    if manifest["model_fingerprint"] != file_fingerprint(str(bank.model)):
        raise BankError(f"{folder}: its scores were made on another benchmark model than {bank.model}; fix: export "
                        "them again from a compare run on this bank (`musicattr benchmark --export_scores true`)")
    have = _query_fingerprints(bank)
    stale = [q for q in qids if q not in manifest["queries"] or manifest["queries"][q] != have.get(q)]
    if stale:
        raise BankError(f"{folder}: no scores, or scores of other latents, for queries {stale[:4]} ({len(stale)} in "
                        "all); fix: export them again from a compare run on this bank's queries")
    out = {}
    for name in names:
        if name not in manifest["methods"]:
            log.info("benchmark: method %s has no shipped scores in %s: left out", name, folder)
            continue
        df = pd.read_parquet(folder / manifest["methods"][name]).set_index("item_id").loc[bank.item_ids]
        out[name] = df.reindex(columns=qids).to_numpy(np.float64).T     # NaN rows: queries it has not scored
    return out

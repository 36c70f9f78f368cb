"""``musicattr benchmark``: any method's scores for the bank's queries, checked against the bank in minutes.

The scores come from a ``musicattr compare`` run on the benchmark model with the bank's queries (``make
benchmark`` runs it: ``prepare: true`` puts the bank's query latents where compare reuses them and writes the
compare options; compare scores every method; this stage then checks that compare used the bank's queries
and not new generations). Any other method is one more scores table per query (``methods``, as in
``musicattr counterfactual``: a Parquet table with ``item_id`` and a score column, one per query id).
Each batch of the bank's queries has its own compare run (``compare_dir_of``); the tables keep the queries
that every listed method has scored, and a later batch's query enters the LDS once ``MIN_SUBSETS`` of its
subsets are retrained (its Spearman over the subsets it has).

What it prints (statistics: ``bank_stats``), over the bank's non-training queries (training-item queries are a
sanity row), on whatever part of the bank is finished (it says how many retrains each number rests on):

    LDS per method with a 95% bootstrap interval over queries and subsets; by query kind; against a null of
        random score vectors per query
    paired differences between methods (same queries, same subsets, same bootstrap draws)
    the retraining-noise ceiling from the two-seed subsets (a perfect expected-loss predictor's LDS)
    leave-K-out: random-K's loss increase; each method's top-K where the bank holds that retrain
    group credit: top-1 and rank correlation of each method's per-group credit against leave-one-group-out
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from musicattr.atomic import atomic_write_json, atomic_write_text
from musicattr.counterfactual import bank_stats as st
from musicattr.counterfactual.bank import Bank
from musicattr.counterfactual.bank_layout import BankError, file_fingerprint_at, query_info
from musicattr.counterfactual.bank_queries import covered_queries, earlier_batches, generation_file
from musicattr.attribution.methods import default_methods
from musicattr.counterfactual.methods import method_scores, parse_methods
from musicattr.counterfactual.shipped_scores import shipped_queries
from musicattr.counterfactual.split import HALVES, read_split
from musicattr.counterfactual.subsets import top_k
from musicattr.data.queries import PREPARED_LISTING, listing_file

log = logging.getLogger(__name__)
DECOMPOSE_DRAWS = 500       # bootstrap draws of each part of an interval's width (queries alone, subsets alone)


# ---------------------------------------------------------------------------------------------- prepare compare
def compare_dir_of(compare_dir: str | Path, batch: int) -> Path:
    """Where ``musicattr compare`` scores a batch of the bank's queries: ``compare`` for the first,
    ``compare/batch-<b>`` for a later one (its ids continue the bank's: ``first_id``)."""
    return Path(compare_dir) if batch == 0 else Path(compare_dir) / f"batch-{batch}"


def _generation_settings(bank: Bank, batch: int) -> dict:
    return {k: v for k, v in json.loads(generation_file(bank.root, batch).read_text()).items() if k != "query_ids"}


def prepare_compare(bank: Bank, store: str, compare_dir: str, fisher: str, index: str | None) -> list[Path]:
    """Put each batch of the bank's queries where ``musicattr compare`` reuses them (``<dir>/generated``: the
    latents, the audio decoded from FLAC to compare's 16-bit wav, queries.json from the latents' own records, and
    the generation settings with this store's and model's fingerprints; ``dir`` from ``compare_dir_of``), and
    write its ``compare_args.yaml``: the batch's prompts, durations, attributes and training items, its first id,
    the benchmark model, Fisher and index; and the batch's listing (``bank_queries.csv``: the peers and the
    index ensemble score a prepared batch before compare has run there)."""
    import soundfile as sf
    import yaml

    from musicattr.data.latent_store import LatentStore

    s = LatentStore(store)
    paths = []
    for batch, table in enumerate(bank.query_batches()):
        out = compare_dir_of(compare_dir, batch)
        gen = out / "generated"
        gen.mkdir(parents=True, exist_ok=True)
        settings = _generation_settings(bank, batch)
        settings.update(checkpoint_fingerprint=file_fingerprint_at(bank.model), store_fingerprint=s.fingerprint,
                        autoencoder_fingerprint=file_fingerprint_at(s.manifest["autoencoder"]))
        generated = table[table["kind"] != "training"]
        infos = []
        for r in generated.to_dict("records"):
            qid = r["query_id"]
            src = bank.root / "queries" / f"{qid}.query.safetensors"
            dst = gen / f"{qid}.query.safetensors"
            if not dst.exists() or file_fingerprint_at(dst) != r["fingerprint"]:
                dst.write_bytes(src.read_bytes())
            info = query_info(dst)
            audio, sr = sf.read(str(bank.root / "queries" / f"{qid}.flac"), dtype="int16", always_2d=True)
            sf.write(str(gen / info["audio"]), audio, sr, subtype="PCM_16")
            infos.append(info)
        atomic_write_json(gen / "queries.json", infos)
        atomic_write_json(gen / "settings.json", settings)
        atomic_write_text(out / PREPARED_LISTING,
                          table[["query_id", "kind", "prompt", "query_item"]].to_csv(index=False))
        prompts = generated[generated["kind"] == "generated"]
        n = len(prompts)
        if list(prompts["prompt"]) != settings["prompts"][:n]:
            raise BankError(f"{bank.root / 'queries'}: queries.csv and the generation settings of batch {batch} list "
                            "other prompts; fix: restore the bank's queries from git")
        args = {"checkpoint": str(bank.model), "store": store, "fisher": fisher, "out_dir": str(out),
                "prompts": settings["prompts"][:n], "durations": settings["durations"][:n],   # as requested
                "prompt_attributes": [json.loads(a) for a in prompts["attributes"]],
                "include_planted": bool((generated["kind"] == "planted").any()),
                "query_items": list(table.loc[table["kind"] == "training", "query_item"]), "training_queries": 0,
                "gen_steps": settings["gen_steps"], "seed": settings["seed"], "index": index}
        if settings.get("first_id"):
            args["first_id"] = int(settings["first_id"])
        path = out / "compare_args.yaml"
        atomic_write_text(path, "# written by `musicattr benchmark --prepare true`: compare on the bank's queries"
                          f"{f' (batch {batch})' if batch else ''}\n"
                          + yaml.safe_dump(args, sort_keys=False, allow_unicode=True, width=200))
        log.info("benchmark: %d bank queries placed in %s; compare options: %s", len(infos), gen, path)
        paths.append(path)
    return paths


def check_compare(bank: Bank, compare_dir: Path, batches: list[int] | None = None, prepared: bool = False,
                  tables: list[pd.DataFrame] | None = None) -> None:
    """The compare runs scored the bank's queries (of ``batches``, default all): same ids, prompts and kinds, and
    the same latents. ``prepared``: a batch folder that was only prepared (its ``bank_queries.csv``; the peers' or
    the ensemble's tables without compare's) passes too. ``tables``: ``bank.query_batches()`` if already read."""
    bad = []
    for batch, table in enumerate(bank.query_batches() if tables is None else tables):
        if batches is not None and batch not in batches:
            continue
        out = compare_dir_of(compare_dir, batch)
        listing = listing_file(out, prepared)
        if not listing.exists():
            raise FileNotFoundError(f"{listing} not found: no finished compare run on the bank's queries "
                                    f"{f'(batch {batch}) ' if batch else ''}; fix: run `make benchmark-scores` "
                                    "(it prepares and runs it), or point `compare` at its out_dir")
        got = pd.read_csv(listing, dtype={"query_id": str}).set_index("query_id")
        for r in table.to_dict("records"):
            qid = r["query_id"]
            if qid not in got.index or str(got.loc[qid, "prompt"]) != str(r["prompt"]) or got.loc[qid, "kind"] != r["kind"]:
                bad.append(f"{qid} (missing or another prompt/kind)")
            elif r["kind"] != "training":
                f = out / "generated" / f"{qid}.query.safetensors"
                if not f.exists() or file_fingerprint_at(f) != r["fingerprint"]:
                    bad.append(f"{qid} (compare generated its own latent instead of the bank's)")
    if bad:
        raise BankError(f"{compare_dir} did not score the bank's queries: {bad[:4]} ({len(bad)} in all); fix: rerun "
                        "`make benchmark-scores` (it places the bank's latents first), or delete that compare run")


def compared_batches(bank: Bank, compare_dir: str | Path, tables: list[pd.DataFrame] | None = None) -> list[int]:
    """The batches whose compare run has finished (its queries.csv exists); ``tables`` as ``check_compare``'s."""
    n = len(bank.query_batches() if tables is None else tables)
    return [b for b in range(n) if (compare_dir_of(compare_dir, b) / "queries.csv").exists()]


# ---------------------------------------------------------------------------------------------- the bank's losses
def bank_losses(bank: Bank, qids: list[str], table: pd.DataFrame | None = None) -> dict:
    """The finished retrains' losses, arranged: lds[seed] [Q, M] (NaN where not finished), reference[seed] [Q],
    group[(name, seed)] [Q], random_k[(seed, set)] [Q], top_k[(method, qid, seed)] (loss, removed ids). A record
    made before a later batch of queries was added (and not filled in since) has NaN for that batch's queries.
    ``table``: the bank's queries table if already read (``bank.queries_table()``)."""
    m = len(bank.design["lds"]["kept"])
    out = {"lds": {}, "reference": {}, "group": {}, "random_k": {}, "top_k": {}, "records": 0}
    key = bank.manifest.get("loss_key")
    table = bank.queries_table() if table is None else table
    earlier = earlier_batches(bank.root, table)
    for rec in bank.records():
        covered = covered_queries(table, earlier, key, rec.get("loss_key"))
        if covered is None:
            log.warning("benchmark: %s was measured with another loss key: left out", rec["name"])
            continue
        covered = set(covered)                  # a record made before a later batch of queries: NaN for those
        missing = [q for q in qids if q in covered and q not in rec["losses"]]
        if missing:
            log.warning("benchmark: %s lacks the losses of %s: left out", rec["name"], missing[:3])
            continue
        v = np.array([rec["losses"][q] if q in covered else np.nan for q in qids], dtype=np.float64)
        out["records"] += 1
        for role in rec["roles"]:
            s = int(role["seed"])
            if role["kind"] == "lds":
                out["lds"].setdefault(s, np.full((len(qids), m), np.nan))[:, int(role["subset"])] = v
            elif role["kind"] == "reference":
                out["reference"][s] = v
            elif role["kind"] == "group":
                out["group"][role["group"], s] = v
            elif role["kind"] == "random-k":
                out["random_k"][s, int(role["set"])] = v
            elif role["kind"] == "top-k":
                out["top_k"][role["method"], role["query_id"], s] = (v, tuple(rec.get("removed", ())))
    return out


# ---------------------------------------------------------------------------------------------- the stage
def run_benchmark(bank_dir: str, store: str | None, compare: str, out_dir: str, methods: list[str | dict] | None = None,
                  prepare: bool = False, fisher: str | None = None, index: str | None = None,
                  bootstrap: int = 2000, null_vectors: int = 200, k: int | None = None, seed: int = 0,
                  half: str = "all", subsets: int | None = None, scores: str | None = None,
                  export_scores: bool = False, batches: list[int] | None = None) -> dict:
    """Check every method's scores against the bank (see the module docstring).

    Args:
        bank_dir: the bank (assets/bank/demo).
        store: the latent store the bank was made on (checked to hold the bank's items; None: not checked, only
            with ``scores``).
        compare: the out_dir of ``musicattr compare`` on the benchmark model and the bank's queries.
        out_dir: where benchmark.md and benchmark.json go.
        methods: registered method names, or {name, table, column, optional} (tables relative to ``compare``);
            default: the registry's default methods (``musicattr.attribution.methods``); ``random`` is an
            independent uniform vector per query.
        prepare: place the bank's queries for compare and write its options (compare_args.yaml), then stop.
        fisher / index: the benchmark model's Fisher and index (for ``prepare``).
        bootstrap: bootstrap draws of every interval; null_vectors: random score vectors per query (>= 100).
        k: K of leave-K-out (default: the bank's random-K size).
        seed: the seed of the bootstrap, the null and the random method.
        half: ``all`` the bank's queries, or one half of ``musicattr.counterfactual.split``: ``tuning`` (where
            methods may be chosen) or ``report`` (held back for the final numbers); written as
            benchmark-<half>.md / .json.
        subsets: use only the design's first ``subsets`` LDS subsets (None: every finished one); a table stays
            reproducible while the bank grows.
        scores: read every method's scores from this shipped folder (``<bank>/scores``, see
            ``musicattr.counterfactual.shipped_scores``) instead of a compare run: the check in minutes on a fresh
            clone; a method without shipped scores is left out.
        export_scores: after checking the compare run, write its methods' scores to ``<bank>/scores`` (with
            ``half: all``).
        batches: only these batches of the bank's queries (None: every batch): with ``subsets``, a table that
            stays put while later batches are scored.
    """
    bank = Bank(bank_dir)
    compare_dir = Path(compare)
    if prepare:
        if not fisher:
            raise ValueError("prepare needs the benchmark model's Fisher (fisher: ...); fix: run "
                             "`make benchmark-scores`")
        return {"compare_args": [str(p) for p in prepare_compare(bank, store, str(compare_dir), fisher, index)]}
    if null_vectors < 100:
        raise ValueError(f"null_vectors = {null_vectors}; fix: at least 100 random score vectors per query")
    if store is not None:
        _check_store(bank, store)
    elif scores is None:
        raise ValueError("store = null needs shipped scores (--scores <bank>/scores); fix: give the store the bank "
                         "was made on, or the shipped scores")
    tables = bank.query_batches()
    if scores is None and batches is not None:                # as asked: compared, or prepared for the peers
        compared = list(batches)
        check_compare(bank, compare_dir, compared, prepared=True, tables=tables)
    elif scores is None:
        compared = compared_batches(bank, compare_dir, tables) or [0]  # none: batch 0's check says what is missing
        check_compare(bank, compare_dir, compared, tables=tables)
    if export_scores and (scores is not None or half != "all"):
        raise ValueError("export_scores writes every query's scores from a compare run; fix: use it with half: all "
                         "and without scores")
    table = every = pd.concat(tables, ignore_index=True)        # = bank.queries_table(), read once
    batch_of = {q: b for b, t in enumerate(tables) for q in t["query_id"]}
    scores_dir = scores
    specs = parse_methods(methods) if methods else default_methods()
    if scores is None:                                       # the compare runs' batches
        table = table[table["query_id"].isin({q for b in compared for q in tables[b]["query_id"]})]
    else:
        table = table[table["query_id"].isin(shipped_queries(scores))]
    if batches is not None:
        if not batches or any(not 0 <= b < len(tables) for b in batches):
            raise ValueError(f"batches = {batches}; fix: some of 0 to {len(tables) - 1} (the bank's query batches)")
        table = table[table["query_id"].isin({q for b in batches for q in tables[b]["query_id"]})]
    if half != "all":
        if half not in HALVES:
            raise ValueError(f"half = {half!r}; fix: one of all, {', '.join(HALVES)}")
        table = table[(read_split(bank.root, table).reindex(table["query_id"]) == half).to_numpy()]
    table = table.reset_index(drop=True)
    qids = list(table["query_id"])
    if scores is not None:
        from musicattr.counterfactual.shipped_scores import read_shipped

        shipped = read_shipped(bank, scores, [m.name for m in specs if m.table is not None], qids)
        chance = method_scores([m for m in specs if m.table is None], compare_dir, qids, bank.item_ids, seed,
                               random_per_query=True)
        method_table = {m.name: shipped.get(m.name, chance.get(m.name)) for m in specs}
        method_table = {k: v for k, v in method_table.items() if v is not None}
    else:
        method_table = _compare_scores(bank, specs, compare_dir, qids, seed, batch_of)
        if export_scores:
            from musicattr.counterfactual.shipped_scores import export_scores as export

            shipped_specs = [m for m in specs if m.table is not None and m.name in method_table]
            export(bank, {m.name: method_table[m.name] for m in shipped_specs}, qids, str(compare_dir),
                   settings=_table_settings(shipped_specs, compare_dir, qids, batch_of))
    # the queries every method has scores for (a later batch may lack a method's tables, e.g. the peers')
    scored = np.all([np.isfinite(v).all(1) for v in method_table.values()], axis=0) if method_table else \
        np.ones(len(qids), bool)
    have, asked = set(np.array(qids)[scored]), set(qids)
    unscored = [q for q in batch_of if q not in have and ((half == "all" and batches is None) or q in asked)]
    if unscored:
        log.info("benchmark: %d queries (%s to %s) lack some method's scores: left out", len(unscored), unscored[0],
                 unscored[-1])
        method_table = {k: v[scored] for k, v in method_table.items()}
        table = table[scored].reset_index(drop=True)
        qids = list(table["query_id"])
    kinds = np.array(table["kind"])
    scores = method_table
    data = bank_losses(bank, qids, every)
    if subsets is not None:
        m = len(bank.design["lds"]["kept"])
        if not 0 < subsets <= m:
            raise ValueError(f"subsets = {subsets}; fix: 1 to {m} (the bank's design has {m} LDS subsets)")
        for v in data["lds"].values():
            v[:, subsets:] = np.nan                     # as if not finished: the LDS uses the first ``subsets``
    result, text = summarize(bank, table, kinds, scores, data, bootstrap, null_vectors, k, seed)
    if unscored:
        text = (f"{len(unscored)} queries ({unscored[0]} to {unscored[-1]}; a later batch) lack the scores of some "
                f"of these methods {'in ' + str(scores_dir) if scores_dir is not None else 'in the compare runs'}: "
                "left out (`--methods` picks the methods that have them).\n\n") + text
    if scores_dir is not None:
        from musicattr.counterfactual.shipped_scores import describe_provenance

        where = describe_provenance(scores_dir, [m for m in scores if m in shipped], qids)
        text += f"\n\nShipped scores ({scores_dir}), by method and export:\n\n{where}\n" if where else ""
    if half != "all":
        text = f"Queries: the {half} half of the bank's ({len(qids)} of them; queries/split.csv).\n\n" + text
        result["half"] = {"half": half, "queries": qids}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "benchmark" if half == "all" else f"benchmark-{half}"
    atomic_write_text(out / f"{name}.md", text)
    atomic_write_json(out / f"{name}.json", result)
    print(text, flush=True)
    return result


def _compare_scores(bank: Bank, specs: list, compare_dir: Path, qids: list[str], seed: int,
                    batch_of: dict[str, int]) -> dict[str, np.ndarray]:
    """Each method's scores [Q, N] from the compare run of each query's batch (NaN rows where a query has no
    table of that optional method yet, e.g. a peer still scoring its batch); ``random`` is one seeded vector per query over all of ``qids``."""
    fix = "run `make benchmark-scores` (compare on the bank's queries)"
    out = method_scores([m for m in specs if m.table is None], compare_dir, qids, bank.item_ids, seed,
                        random_per_query=True)
    for m in specs:
        if m.table is None:
            continue
        values = np.full((len(qids), len(bank.item_ids)), np.nan)
        for b in sorted({batch_of[q] for q in qids}):
            rows = [i for i, q in enumerate(qids) if batch_of[q] == b]
            got = method_scores([m], compare_dir_of(compare_dir, b), [qids[i] for i in rows], bank.item_ids, seed,
                                fix=fix, partial=True)
            if m.name in got:
                values[rows] = got[m.name]
        if np.isfinite(values).all(1).any():
            out[m.name] = values
    return {m.name: out[m.name] for m in specs if m.name in out}


def _table_settings(specs: list, compare_dir: Path, qids: list[str],
                    batch_of: dict[str, int]) -> dict[str, list[dict | None]]:
    """Per method, each query's table settings: the ``settings.json`` beside a ``scores.parquet`` (the peers' and
    the index's tables) less what names the query, else None."""
    from musicattr.peers.common import SETTINGS_FILE

    out = {}
    for m in specs:
        got = []
        for q in qids:
            table = m.path(compare_dir_of(compare_dir, batch_of[q]), q)
            f = table.with_name(SETTINGS_FILE)
            got.append(_without_query(json.loads(f.read_text()), q) if table.name == "scores.parquet" and f.exists()
                       else None)
        out[m.name] = got
    return out


def _without_query(settings, query_id: str):
    """A table's settings without what names its query (its id in paths, its fingerprint), so that the queries
    scored alike share one settings record."""
    if isinstance(settings, dict):
        return {k: _without_query(v, query_id) for k, v in settings.items() if k not in ("query_id", "query_fingerprint")}
    if isinstance(settings, list):
        return [_without_query(v, query_id) for v in settings]
    return settings.replace(query_id, "{query_id}") if isinstance(settings, str) else settings


def _check_store(bank: Bank, store: str) -> None:
    from musicattr.data.latent_store import LatentStore

    s = LatentStore(store)
    ids = list(s.items["item_id"].astype(str))
    if ids != bank.item_ids:
        raise BankError(f"{store} holds other items than the bank {bank.root} ({len(ids)} vs {len(bank.item_ids)}); "
                        "fix: use the store the bank was made on (`make demo` on the shipped corpus)")
    if s.fingerprint != bank.manifest["store"]["fingerprint"]:
        log.info("benchmark: the store's fingerprint differs from the bank's (%s vs %s; the project's fingerprint "
                 "names the audio folder's path); the items are the same", s.fingerprint,
                 bank.manifest["store"]["fingerprint"])


def _fmt(v, ci=None, nd=3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    s = f"{v:.{nd}f}"
    return s + (f" [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]" if ci is not None else "")


def summarize(bank: Bank, table: pd.DataFrame, kinds: np.ndarray, scores: dict[str, np.ndarray], data: dict,
              draws: int, null_vectors: int, k: int | None, seed: int) -> tuple[dict, str]:
    """The tables as markdown, and the numbers as a dict."""
    kept = bank.kept()
    lines, result = [], {"retrains": data["records"], "methods": list(scores)}
    plan = bank.plan()
    planned = len(plan) if plan is not None else None
    head = (f"Counterfactual benchmark on {bank.root}: {data['records']} finished retrains of {planned} planned "
            f"({bank.manifest['recipe']['describe']}), query losses over {bank.manifest['loss_key']['num_draws']} "
            f"fixed draws. Intervals: 95% bootstrap, {draws} draws.")
    lines += [head, ""]
    lds_seed = int(bank.manifest["settings"]["lds"]["seed"])
    second = int(bank.manifest["settings"]["lds"]["second_seed"])
    la = data["lds"].get(lds_seed)
    done = np.flatnonzero(~np.isnan(la).all(0)) if la is not None else np.array([], int)
    count = (~np.isnan(la[:, done])).sum(1) if la is not None else np.zeros(len(kinds), int)
    measured = (count >= MIN_SUBSETS) | ((count == len(done)) & (count > 0))   # a later batch's: from MIN_SUBSETS on
    headline = (kinds != "training") & measured
    waiting = int(((kinds != "training") & ~measured).sum())
    nq = int(headline.sum())
    result["lds_queries"], result["lds_subsets"] = nq, int(len(done))
    lines.append(f"## LDS ({nq} non-training queries: {int((kinds[headline] == 'generated').sum())} generated, "
                 f"{int((kinds[headline] == 'planted').sum())} planted; {len(done)} of {kept.shape[0]} subsets at "
                 f"alpha {bank.design['lds']['alpha']}, seed {lds_seed})")
    lines.append("")
    if waiting:
        lines += [f"{waiting} more non-training queries (a later batch) have fewer than {MIN_SUBSETS} of these subsets "
                  "retrained since they were added: not in this table yet.", ""]
    partial = headline & np.isnan(la[:, done]).any(1) if la is not None else headline & False
    if partial.any():
        lines += [f"{int(partial.sum())} of these queries (a later batch) have "
                  "losses only on the subsets retrained after they were added; each query's Spearman uses the "
                  "subsets it has.", ""]
    if len(done) < 4:
        lines += [f"Not yet: {len(done)} subsets finished; the LDS needs at least 4 (it grows as `make bank` runs).", ""]
    else:
        loss = la[:, done]
        sums = {m: st.subset_sums(v, kept[done]) for m, v in scores.items()}
        boot = st.lds_bootstrap({m: g[headline] for m, g in sums.items()}, loss[headline], draws, seed,
                                decompose=min(draws, DECOMPOSE_DRAWS))
        null = st.lds_null(kept[done], loss[headline], null_vectors, seed)
        train = kinds == "training"
        sanity = {m: np.nanmean(st.row_spearman(g[train], -loss[train])) if train.any() else np.nan
                  for m, g in sums.items()}
        rows = ["| method | LDS [95% CI] | generated | planted | p vs null | training items (sanity) |",
                "|---|---|---|---|---|---|"]
        result["lds"] = {}
        for m in scores:
            est, lo, hi, per = boot["lds"][m]
            by = {kind: float(np.nanmean(per[kinds[headline] == kind])) if (kinds[headline] == kind).any() else np.nan
                  for kind in ("generated", "planted")}
            p = st.null_p(est, null)
            rows.append(f"| {m} | {_fmt(est, (lo, hi))} | {_fmt(by['generated'])} | {_fmt(by['planted'])} | "
                        f"{p:.3f} | {_fmt(sanity[m])} |")
            result["lds"][m] = {"lds": est, "ci": [lo, hi], **by, "p_null": p, "training": sanity[m]}
        rows.append(f"| null: {null_vectors} random vectors per query | {_fmt(null['mean'], (null['lo'], null['hi']))}"
                    " (95% range) | | | | |")
        result["null"] = {k2: null[k2] for k2 in ("mean", "lo", "hi")}
        lines += rows + ["", "LDS: mean over queries of Spearman over subsets of (summed scores, -loss); its interval "
                         "resamples queries and subsets. p vs null: (1 + random vectors whose LDS >= the method's) / "
                         f"({null_vectors} + 1), on these queries and subsets. The training-item queries are a sanity "
                         "row (each sits in about half the subsets), never in the LDS.", ""]
        lines += ["Paired differences (row minus column; same queries, subsets and bootstrap draws); * where the "
                  "95% interval excludes 0:", ""]
        names = list(scores)
        lines.append("| | " + " | ".join(names[1:]) + " |")
        lines.append("|---" * len(names) + "|")
        result["pairs"] = {}
        for a in names[:-1]:
            cells = []
            for c in names[1:]:
                pair = boot["pairs"].get((a, c))
                if pair is None:
                    cells.append("")
                    continue
                d, lo, hi, _ = pair
                cells.append(_fmt_star(d, (lo, hi), sign=True))
                wq, wj = boot["widths"][a, c]
                result["pairs"][f"{a} - {c}"] = {"diff": d, "ci": [lo, hi], "half_width": (hi - lo) / 2,
                                                 "half_width_queries_alone": wq, "half_width_subsets_alone": wj}
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
        first = names[0]
        widths = [f"{c} {result['pairs'][f'{first} - {c}']['half_width']:.3f} "
                  f"({result['pairs'][f'{first} - {c}']['half_width_queries_alone']:.3f} / "
                  f"{result['pairs'][f'{first} - {c}']['half_width_subsets_alone']:.3f})" for c in names[1:]]
        lines += [f"Where the intervals' widths come from: half-width of {first} minus each method, then (in brackets) "
                  f"with only the {nq} queries resampled / only the {len(done)} subsets resampled "
                  f"({min(draws, DECOMPOSE_DRAWS)} draws each): " + "; ".join(widths) + ". Each part shrinks about "
                  "as one over the square root of its own count (more queries, or more subsets: `make bank` grows "
                  "the design), and the joint half-width is about the root of their squares' sum.", ""]
        lb = data["lds"].get(second)
        paired = np.flatnonzero(~np.isnan(lb[0])) if lb is not None else np.array([], int)
        paired = np.array([j for j in paired if j in set(done)], int)
        if len(paired) < 3:
            lines += [f"Retraining-noise ceiling: not yet ({len(paired)} subsets retrained with seed {second}; needs "
                      "at least 3).", ""]
        else:
            pos = {j: i for i, j in enumerate(done)}
            full = headline & ~partial               # the queries measured on every subset, the pairs among them
            ceil = st.noise_ceiling(loss[full], lb[full][:, done], np.array([pos[j] for j in paired]), draws, seed)
            result["ceiling"] = {k2: v for k2, v in ceil.items() if k2 != "per_query"}
            lines += [f"Retraining-noise ceiling ({ceil['pairs']} subsets with seeds {lds_seed} and {second}, "
                      f"{ceil['subsets']} subsets for the spread"
                      f"{f', the {int(full.sum())} queries measured on all of them' if partial.any() else ''}): a perfect expected-loss predictor reaches LDS "
                      f"{_fmt(ceil['ceiling'], ceil['ceiling_ci'])}; reliability 1 - seed variance / subset "
                      f"variance {_fmt(ceil['reliability'], ceil['reliability_ci'])}; seed-to-seed Spearman over "
                      f"the pairs {_fmt(ceil['seed_spearman'], ceil['seed_spearman_ci'])}.", ""]
    lines += _leave_k_out(bank, table, kinds, scores, data, draws, seed, k, result)
    lines += _groups(bank, kinds, scores, data, draws, seed, result)
    return result, "\n".join(lines) + "\n"


def _leave_k_out(bank, table, kinds, scores, data, draws, seed, k, result) -> list[str]:
    headline = kinds != "training"
    k = k or int(bank.design["random_k"]["k"])
    seeds = sorted({s for s, _ in data["random_k"]} & set(data["reference"]))
    lines = [f"## Leave-K-out (K = {k}; increase = L(q, theta without the K) - L(q, theta0' of the same seed))", ""]
    if not seeds:
        return lines + ["Not yet: no random-K retrain with its seed's theta0' is finished.", ""]
    sets = max(r for _, r in data["random_k"]) + 1
    inc = np.full((int(headline.sum()), len(seeds), sets), np.nan)
    for a, s in enumerate(seeds):
        for r in range(sets):
            if (s, r) in data["random_k"]:
                inc[:, a, r] = (data["random_k"][s, r] - data["reference"][s])[headline]
    measured = ~np.isnan(inc).all((1, 2))           # a later batch's queries lack the random-K retrained before them
    est, lo, hi = st.increase_bootstrap(inc[measured], draws, seed)
    n = int((~np.isnan(inc).all(0)).sum())
    nq = int(measured.sum())
    within = lo <= 0 <= hi
    lines.append(f"random-K: mean increase {_fmt(est, (lo, hi), 4)} over {nq} queries, {n} random "
                 f"sets in {len(seeds)} seed(s){' (within noise: no ratio to it is given)' if within else ''}.")
    result["random_k"] = {"increase": est, "ci": [lo, hi], "sets": n, "within_noise": within, "by_seed": {}}
    if len(seeds) > 1:
        lds_seed = int(bank.manifest["settings"]["lds"]["seed"])
        parts = []
        for a, s in enumerate(seeds):
            e, l2, h2 = st.increase_bootstrap(inc[measured, a:a + 1], draws, seed)
            result["random_k"]["by_seed"][str(s)] = {"increase": e, "ci": [l2, h2]}
            parts.append(f"seed {s} {_fmt(e, (l2, h2), 4)}" + (" (its theta0' is the benchmark model, which generated "
                                                                "the queries)" if s == lds_seed else ""))
        lines.append("By seed (each against its own theta0': a seed's reference is one retrain, so its noise is "
                     "common to all of that seed's sets; a method's top-K below is paired with random-K of the same "
                     "seed, where it cancels): " + "; ".join(parts) + ".")
    rows = []
    qpos = {q: n for n, q in enumerate(table["query_id"])}
    hpos = {q: n for n, q in enumerate(np.flatnonzero(headline))}
    result["top_k"] = {}
    per_pair = {}                                    # method -> {(query, seed): top-K increase}
    for m in scores:
        vals, raw, refs, stale = [], [], [], 0
        for (method, qid, s), (v, removed) in data["top_k"].items():
            q = qpos.get(qid)
            if method != m or s not in seeds or q is None or not headline[q]:
                continue
            if tuple(sorted(removed)) != top_k(scores[m][q], bank.item_ids, k):
                stale += 1                                       # the bank retrained another top-K than these scores'
                continue
            up = v[q] - data["reference"][s][q]
            rk = np.nanmean(inc[hpos[q], seeds.index(s)])           # random-K's increase, same query and seed
            raw.append(up)
            refs.append(rk)
            vals.append(up - rk)
            per_pair.setdefault(m, {})[hpos[q], seeds.index(s)] = up
        if vals or stale:
            e, l2, h2 = st.increase_bootstrap(np.array(vals)[:, None, None], draws, seed) if vals else (np.nan,) * 3
            ref = float(np.mean(refs)) if refs else np.nan           # random-K over the same (query, seed) pairs
            ratio = float(np.mean(raw)) / ref if raw and not within and ref > 0 else np.nan  # only off the noise
            rows.append(f"| {m} | {len(vals)} | {_fmt(float(np.mean(raw)) if raw else np.nan, nd=4)} | "
                        f"{_fmt(e, (l2, h2), 4)} | {_fmt(ratio, nd=1)} | {stale} |")
            result["top_k"][m] = {"pairs": len(vals), "increase": float(np.mean(raw)) if raw else None,
                                  "excess_over_random": e, "ci": [l2, h2], "other_top_k": stale,
                                  "random_k_same_pairs": ref if refs else None,
                                  "ratio": None if not np.isfinite(ratio) else ratio}
    if rows:
        lines += ["", "| method | (query, seed) pairs | top-K increase | minus random-K's (same query and seed) [95% CI] "
                  "| ratio to random-K's increase on the same queries and seeds (- where random-K is within noise) | pairs whose banked top-K differs from "
                  "these scores' |", "|---|---|---|---|---|---|", *rows]
        lines += _paired_top_k(per_pair, inc.shape[:2], draws, seed, result)
    else:
        lines.append("No method's top-K retrain is in the bank yet: a method's leave-K-out needs its top-K retrained "
                     "(chosen by `make bank` from the benchmark's scores, then frozen); random-K above is the "
                     "reference.")
    return lines + [""]


def _paired_top_k(per_pair: dict, shape: tuple[int, int], draws: int, seed: int, result: dict) -> list[str]:
    """Leave-K-out method minus method on the (query, seed) pairs both have in the bank: the difference of their
    top-K increases (random-K's reference cancels), bootstrapped over queries and seeds."""
    names = [m for m in per_pair if per_pair[m]]
    if len(names) < 2:
        return []
    rows, result["top_k_pairs"] = [], {}
    for a in range(len(names)):
        for c in range(a + 1, len(names)):
            common = sorted(set(per_pair[names[a]]) & set(per_pair[names[c]]))
            if not common:
                continue
            d = np.full((*shape, 1), np.nan)
            for qs in common:
                d[qs] = per_pair[names[a]][qs] - per_pair[names[c]][qs]
            e, lo, hi = st.increase_bootstrap(d, draws, seed)
            rows.append(f"| {names[a]} | {names[c]} | {len(common)} | {_fmt_star(e, (lo, hi), sign=True, nd=4)} |")
            result["top_k_pairs"][f"{names[a]} - {names[c]}"] = {"pairs": len(common), "diff": e, "ci": [lo, hi]}
    return ["", "Paired leave-K-out (row minus column: the difference of the two methods' top-K increases on the "
            "(query, seed) pairs both have; interval over queries and seeds; * where it excludes 0):", "",
            "| method | minus | (query, seed) pairs | difference [95% CI] |", "|---|---|---|---|", *rows]


GROUP_SIZE = "group size (reference)"
MIN_SUBSETS = 8          # a query enters the LDS once this many of its subsets are retrained (a later batch's)
GROUP_PERMUTATIONS = 100


def _groups(bank, kinds, scores, data, draws, seed, result) -> list[str]:
    headline = kinds != "training"
    names = list(bank.design["groups"])
    seeds = sorted({s for g, s in data["group"] if s in data["reference"]})
    complete = [s for s in seeds if all((g, s) in data["group"] for g in names)]
    lines = [f"## Group credit (leave-one-group-out over {len(names)} groups: {', '.join(names)})", ""]
    if not complete:
        return lines + [f"Not yet: {len(data['group'])} of {len(names)} x seeds group retrains finished (a seed counts "
                        "once every group and its theta0' are).", ""]
    truth = np.mean([np.stack([data["group"][g, s] - data["reference"][s] for g in names], 1) for s in complete], 0)
    headline = headline & np.isfinite(truth).all(1)     # a later batch's queries lack the group retrains before them
    truth = truth[headline]
    ids = bank.item_ids
    pos = {i: n for n, i in enumerate(ids)}
    member = np.zeros((len(names), len(ids)))
    for a, g in enumerate(names):
        member[a, [pos[i] for i in bank.design["groups"][g]]] = 1
    credits = {m: (v @ member.T)[headline] for m, v in scores.items()}
    nulls = {m: permuted_credits(v[headline], member, GROUP_PERMUTATIONS, [seed, a])
             for a, (m, v) in enumerate(scores.items())}
    sizes = member.sum(1)
    credits[GROUP_SIZE] = np.broadcast_to(sizes, (int(headline.sum()), len(names))).copy()
    gc = st.group_credit(credits, truth, draws, seed, nulls)
    result["groups"] = gc
    lines += [f"Truth: the query loss increase when a group is removed (seeds {complete}); credit: the sum of a "
              f"method's scores over the group. Top-1 chance (uniform): {gc['chance_top1']:.3f}. Group sizes "
              f"{', '.join(str(int(n)) for n in sizes)} tracks: the truth grows with a group's size, and so does a sum "
              f"of scores whose mean is not zero, so the row `{GROUP_SIZE}` (credit = the number of tracks) is the "
              f"reference, and each method is also given minus its own permuted null ({GROUP_PERMUTATIONS} "
              "permutations of its scores over the items of each query: the same distribution, no knowledge of "
              "which track is which; * where the interval excludes zero).", "",
              "| method | top-1 [95% CI] | Spearman across groups [95% CI] | top-1 minus permuted | Spearman minus "
              "permuted |", "|---|---|---|---|---|"]
    for m in [*scores, GROUP_SIZE]:
        g = gc[m]
        extra = " | ".join(_fmt_star(g[f"excess_{k}"], g[f"excess_{k}_ci"], sign=True) for k in ("top1", "spearman")) \
            if "excess_top1" in g else " | "
        lines.append(f"| {m} | {_fmt(g['top1'], g['top1_ci'])} | {_fmt(g['spearman'], g['spearman_ci'])} | {extra} |")
    return lines + [""]


def permuted_credits(scores: np.ndarray, member: np.ndarray, permutations: int, seed) -> np.ndarray:
    """[P, Q, G] group sums of ``scores`` [Q, N] with each query's scores permuted over the items (seeded)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permuted(scores, axis=1) @ member.T for _ in range(permutations)])


def _fmt_star(value: float, ci, sign: bool = False, nd: int = 3) -> str:
    """``value* [lo, hi]``: the star (the 95% interval excludes 0) right after the value, in every table."""
    lo, hi = ci
    f = f"+.{nd}f" if sign else f".{nd}f"
    return f"{value:{f}}" + ("*" if lo > 0 or hi < 0 else "") + f" [{lo:{f}}, {hi:{f}}]"

"""The attribution index (attribution/index.py, sketch.py, query.py): with the identity projection it gives the
exact first-order product, the sketch keeps inner products within its Johnson-Lindenstrauss bound, a killed
build resumes, 1 and 2 DDP ranks build the same index, and an index built with other settings is refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import (build_fisher_setup, chdir, cli, kill_when_parts_appear, make_module, make_store, save_checkpoint,
                      stage_trainer)
from musicattr.attribution.cache import cache_path
from musicattr.attribution.fisher import load_fisher
from musicattr.attribution.index import AttributionIndex, IndexMismatchError, IndexModule
from musicattr.attribution.loss import UNLEARN
from musicattr.attribution.query import run_query
from musicattr.attribution.score import ScoringModule
from musicattr.attribution.sketch import SignSketch, fold
from musicattr.attribution.task import load_theta
from musicattr.attribution.unlearn import load_unlearned, loss_gradient, run_unlearn, save_unlearned
from musicattr.data.datamodules import StorePredictDataModule, collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.parts import TensorFormat
from musicattr.atomic import finished_files


N_ITEMS, T, K, LR, DAMPING = 12, 4, 6, 1e-6, 1e-3
TRAINER = ["--trainer.accelerator", "cpu", "--trainer.default_root_dir", "lightning"]


def build(d: Path, out: str, batch_size: int = 5, **kw) -> AttributionIndex:
    """`musicattr index` in this process (the same module, data module and writer)."""
    kw = {"num_draws": T, "k": 1024, "flush_every": 1, **kw}
    with chdir(d):
        stage_trainer().predict(IndexModule("theta0.ckpt", "fisher.safetensors", out, **kw),
                                datamodule=StorePredictDataModule("store", batch_size))
    return AttributionIndex(d / out)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A store, theta0, its Fisher, one unlearned training item and an identity index (phi itself)."""
    d = tmp_path_factory.mktemp("index")
    build_fisher_setup(d, N_ITEMS)
    with chdir(d):
        run_unlearn("theta0.ckpt", "fisher.safetensors", "q3.safetensors", query_item="3", store="store", lr=1e-5,
                    num_draws=K, damping=DAMPING)
    build(d, "identity", projection="identity", k=None)
    return d


def flat(g: dict, names) -> torch.Tensor:
    return torch.cat([g[k].reshape(-1).double() for k in names])


@pytest.fixture(scope="module")
def hand(work):
    """g_i (scoring draws), g_q (unlearning draws of item 3, M_U), (F + lambda)^-1 and theta_u - theta0, by hand."""
    task, model = load_theta(None, str(work / "theta0.ckpt"))
    params = task.select_parameters(model, "all")
    names = sorted(params)
    store = LatentStore(work / "store")
    grads = torch.stack([flat(loss_gradient(task, model, params, collate_items([store[p]]), 0, T), names)
                         for p in range(N_ITEMS)])
    gq = flat(loss_gradient(task, model, params, collate_items([store[3]]), 0, K, namespace=UNLEARN, mask=True), names)
    fisher, meta = load_fisher(str(work / "fisher.safetensors"))
    f = flat(fisher, names)
    inv = 1.0 / (f + DAMPING * f.mean())
    changed, _ = load_unlearned(str(work / "q3.safetensors"))
    delta = flat({k: changed[k].double() - params[k].detach().double() for k in names}, names)
    with torch.no_grad():
        losses = task.item_loss(model, collate_items([store[p] for p in range(N_ITEMS)]), 0, T)
    return {"g": grads, "gq": gq, "inv": inv, "n": int(meta["num_items"]), "delta": delta, "loss": losses,
            "names": names}


def phi_rows(index: AttributionIndex) -> np.ndarray:
    """The stored P phi_i, rows in item-index order."""
    rows = np.zeros((index.num_items, index.k), dtype=np.float32)
    from safetensors.torch import load_file

    for shard, part in index.items.groupby("shard"):
        phi = load_file(str(index.root / shard))["phi"].numpy()
        rows[part["index"].to_numpy()] = phi[part["row"].to_numpy()]
    return rows


def query(work, out, **kw):
    args = {"index": str(work / "identity"), "checkpoint": str(work / "theta0.ckpt"),
            "fisher": str(work / "fisher.safetensors"), "out_dir": str(out), "store": str(work / "store"), "lr": LR,
            "num_draws": K, "top_k": 0, **kw}
    return run_query(**args)


def by_index(path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("index").reset_index(drop=True)


# ---------------------------------------------------------------- the identity projection: exact first order


def test_identity_index_stores_phi_sensitivity_and_baseline(work, hand):
    index = AttributionIndex(work / "identity")
    assert index.k == hand["g"].shape[1] == index.provenance["parameters"]
    phi = hand["g"] * hand["inv"].sqrt()
    np.testing.assert_allclose(phi_rows(index), phi.numpy(), rtol=1e-4, atol=1e-6 * float(phi.abs().max()))
    items = index.items.sort_values("index")
    np.testing.assert_allclose(items["sensitivity"], phi.norm(dim=1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(items["baseline_loss"], hand["loss"].numpy(), rtol=1e-6)


def test_identity_index_score_equals_exact_first_order_product(work, hand, tmp_path):
    summary = query(work, tmp_path, query_items=["index:3"], unlearned=[str(work / "q3.safetensors")])
    assert [s["source"] for s in summary] == ["gradient", "unlearned"]
    # psi from the query gradient: tau^_i = lr/N g_i^T (F + lambda)^-1 g_q
    exact = LR / hand["n"] * hand["g"] @ (hand["inv"] * hand["gq"])
    df = by_index(Path(summary[0]["folder"]) / "scores.parquet")
    scale = float(exact.abs().max())
    assert scale > 0
    np.testing.assert_allclose(df["score"], exact.numpy(), rtol=0, atol=1e-5 * scale)
    s = (hand["g"].pow(2) * hand["inv"]).sum(1).sqrt()
    rel = exact / s
    np.testing.assert_allclose(df["relative_score"], rel.numpy(), rtol=0, atol=1e-5 * float(rel.abs().max()))
    # psi from the unlearned weights: tau^_i = <g_i, theta_u - theta0>
    first = hand["g"] @ hand["delta"]
    du = by_index(Path(summary[1]["folder"]) / "scores.parquet")
    np.testing.assert_allclose(du["score"], first.numpy(), rtol=0, atol=1e-5 * float(first.abs().max()))
    # the table of exact scoring, method index, one row per item, ranked
    for t in (df, du):
        assert set(t["method"]) == {"index"} and sorted(t["rank"]) == list(range(1, N_ITEMS + 1))
        np.testing.assert_allclose(t["unlearned_loss"] - t["baseline_loss"], t["score"], rtol=1e-6, atol=1e-15)
    # ... with the columns of exact scoring, whose Eq. 1 scores the first-order ones approximate
    exact_table = score_exact(work, tmp_path / "exact")
    assert list(pd.read_parquet(Path(summary[1]["folder"]) / "scores.parquet").columns) == list(exact_table.columns)
    corr = np.corrcoef(exact_table.sort_values("index")["score"], du["score"])[0, 1]
    print(f"first-order index scores vs exact Eq. 1 (lr 1e-5): correlation {corr:.6f}")
    assert corr > 0.999


def score_exact(work, out) -> pd.DataFrame:
    """`musicattr attribute --model.relative true` of q3.safetensors in this process."""
    with chdir(work):
        m = ScoringModule("theta0.ckpt", "q3.safetensors", str(out), num_draws=T, relative=True,
                          use_baseline_cache=False)
        stage_trainer().predict(m, datamodule=StorePredictDataModule("store", 4))
    return pd.read_parquet(Path(out) / "scores.parquet")


def test_many_queries_share_one_pass_and_the_report_reads_them(work, tmp_path, monkeypatch):
    from musicattr.attribution import index as index_module
    from musicattr.report.inputs import load_query_inputs

    calls = []
    real = index_module.AttributionIndex.scores
    monkeypatch.setattr(index_module.AttributionIndex, "scores", lambda self, psi: calls.append(psi.shape) or
                        real(self, psi))
    summary = query(work, tmp_path, query_items=["index:3", "audio/track005.wav"],
                    unlearned=[str(work / "q3.safetensors")])
    assert len(calls) == 1 and calls[0][1] == 3
    assert json.loads((tmp_path / "queries.json").read_text())[1]["query_id"] == "audio/track005.wav"
    q = load_query_inputs(summary[1]["folder"])
    assert q.query_id == "audio/track005.wav" and q.prompt == "caption 5" and len(q.scores) == N_ITEMS
    assert q.run["method"] == "index" and q.run["unlearned"]["num_draws"] == K


def test_unprojected_first_order_pass_equals_the_hand_product(work, hand):
    """The fidelity script's unprojected row: <phi_i, psi> for every item without storing phi."""
    from musicattr.attribution.query import open_query
    from musicattr.evaluation.fidelity import first_order_scores

    ctx = open_query(str(work / "identity"), str(work / "theta0.ckpt"), str(work / "fisher.safetensors"),
                     str(work / "store"))
    psi, _ = ctx.from_unlearned(str(work / "q3.safetensors"))
    dots, s = first_order_scores(ctx.task, ctx.model, ctx.params, ctx.precond, ctx.store, [psi], 0, T, batch_size=5)
    first = (hand["g"] @ hand["delta"]).numpy()
    np.testing.assert_allclose(dots[:, 0], first, rtol=0, atol=1e-6 * np.abs(first).max())
    np.testing.assert_allclose(s, (hand["g"].pow(2) * hand["inv"]).sum(1).sqrt().numpy(), rtol=1e-5)


# ---------------------------------------------------------------- the sketch


def test_sketch_keeps_inner_products_within_the_jl_bound():
    """P(|<Px,Py> - <x,y>| > eps ||x|| ||y||) <= 2 / (k eps^2) (sketch.py), for dense and for spiky vectors."""
    k, trials, sizes = 256, 300, {"a.weight": 3000, "b.weight": 1500, "c.bias": 500}
    eps = (2 / (k * 0.1)) ** 0.5  # the bound's failure probability 0.1
    g = torch.Generator().manual_seed(0)
    for kind in ("dense", "spiky"):
        errors = []
        for trial in range(trials):
            x = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in sizes.items()}
            y = {n: 0.5 * x[n] + torch.randn(s, generator=g, dtype=torch.float64) for n, s in sizes.items()}
            if kind == "spiky":  # heavy tails: a few coordinates carry most of the norm
                x = {n: v ** 3 for n, v in x.items()}
                y = {n: v ** 3 for n, v in y.items()}
            p = SignSketch(sizes, k, seed=trial)
            px, py = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
            for n in sizes:
                p.add(px, n, x[n])
                p.add(py, n, y[n])
            fx, fy = torch.cat(list(x.values())), torch.cat(list(y.values()))
            errors.append(float((px @ py - fx @ fy) / (fx.norm() * fy.norm())))
        e = np.array(errors)
        print(f"{kind}: mean error {e.mean():+.4f}, std {e.std():.4f} (bound sqrt(2/k) = {(2 / k) ** .5:.4f}), "
              f"beyond eps={eps:.3f}: {np.mean(np.abs(e) > eps):.3f} (bound 0.1)")
        assert np.mean(np.abs(e) > eps) <= 0.1
        assert e.std() <= (2 / k) ** 0.5 * 1.15  # Var <= 2/k, with room for the estimate's own noise
        assert abs(e.mean()) < 4 * e.std() / trials ** 0.5  # unbiased


def test_sketch_at_a_divisor_of_k_is_the_folded_sketch():
    sizes = {"w": 5000, "v": 77}
    x = {n: torch.randn(s, dtype=torch.float64) for n, s in sizes.items()}
    big, small = SignSketch(sizes, 4096, seed=3), SignSketch(sizes, 512, seed=3)
    yb, ys = torch.zeros(4096, dtype=torch.float64), torch.zeros(512, dtype=torch.float64)
    for n in sizes:
        big.add(yb, n, x[n])
        small.add(ys, n, x[n])
    torch.testing.assert_close(fold(yb, 512), ys, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="does not divide"):
        fold(yb, 3000)


def test_sketched_index_approximates_the_identity_index(work, hand, tmp_path):
    sketched = build(work, str(tmp_path / "sk"), k=4096, batch_size=12)
    assert sketched.k == 4096
    exact = phi_rows(AttributionIndex(work / "identity")).astype(np.float64)
    rows = phi_rows(sketched).astype(np.float64)
    gram_exact, gram = exact @ exact.T, rows @ rows.T
    norms = np.sqrt(np.diag(gram_exact))
    err = np.abs(gram - gram_exact) / np.outer(norms, norms)
    print(f"sketch k=4096 vs exact Gram matrix: max relative error {err.max():.4f}")
    assert err.max() < 6 * (2 / 4096) ** 0.5  # 6 standard deviations of the bound
    np.testing.assert_allclose(sketched.items.sort_values("index")["sensitivity"], norms, rtol=1e-5)


# ---------------------------------------------------------------- provenance


def test_index_built_with_other_settings_is_refused_with_the_fix(work, tmp_path):
    build(work, str(tmp_path / "ix"))
    shards = sorted((tmp_path / "ix" / "shards").glob("part-*"))
    with pytest.raises(IndexMismatchError, match="overwrite true") as e:
        build(work, str(tmp_path / "ix"), k=2048)
    assert str(tmp_path / "ix") in str(e.value)
    assert sorted((tmp_path / "ix" / "shards").glob("part-*")) == shards  # nothing deleted
    rebuilt = build(work, str(tmp_path / "ix"), k=2048, overwrite=True)
    assert rebuilt.k == 2048 and rebuilt.provenance["k"] == 2048

    index = str(tmp_path / "ix")
    cases = [({"k": 1024}, "k: index 2048, given 1024"), ({"damping": 0.01}, "damping"),
             ({"score_draws": T + 1}, "num_draws"), ({"score_seed": 1}, "seed"), ({"target": "self"}, "tensors"),
             ({"strategy": "both"}, "mask_loss")]
    for kw, what in cases:
        with pytest.raises(IndexMismatchError, match="fix: rebuild it with `musicattr index`") as e:
            query(work, tmp_path / "q", index=index, query_items=["3"], **kw)
        assert what in str(e.value), (kw, str(e.value))
    save_checkpoint(make_module(seed=9), tmp_path / "other.ckpt")
    with pytest.raises(IndexMismatchError, match="checkpoint_fingerprint"):
        query(work, tmp_path / "q", index=index, query_items=["3"], checkpoint=str(tmp_path / "other.ckpt"))
    other_fisher = tmp_path / "fisher.safetensors"
    other_fisher.write_bytes((work / "fisher.safetensors").read_bytes() + b" ")
    with pytest.raises(IndexMismatchError, match="fisher_fingerprint"):
        query(work, tmp_path / "q", index=index, query_items=["3"], fisher=str(other_fisher))
    # an unlearned file made with another damping
    tensors, meta = load_unlearned(str(work / "q3.safetensors"))
    save_unlearned(str(tmp_path / "d.safetensors"), tensors, {**meta, "damping": 0.1})
    with pytest.raises(IndexMismatchError, match="damping: file 0.1, index 0.001"):
        query(work, tmp_path / "q", index=index, unlearned=[str(tmp_path / "d.safetensors")])
    with pytest.raises(FileNotFoundError, match="not a finished attribution index"):
        query(work, tmp_path / "q", index=str(tmp_path / "nothing"), query_items=["3"])


def test_attribute_reuses_the_sensitivities_of_the_index(work, tmp_path):
    """The index fills the sensitivity cache under the key of `musicattr attribute --model.relative true`."""
    index = build(work, str(tmp_path / "ix"))
    with chdir(work):
        m = ScoringModule("theta0.ckpt", "q3.safetensors", str(tmp_path / "a"), num_draws=T, relative=True)
        path = cache_path(work / "store", "sensitivity", m.sensitivity_key(LatentStore(work / "store")))
        try:
            assert path.exists()
            cached = pd.read_parquet(path).sort_values("index")
            np.testing.assert_array_equal(cached["sensitivity"], index.items.sort_values("index")["sensitivity"])
            cached.assign(sensitivity=cached["sensitivity"] * 2).to_parquet(path, index=False)  # proof of reading
            stage_trainer().predict(m, datamodule=StorePredictDataModule("store", 4))
        finally:
            if path.exists():
                path.unlink()
    df = by_index(tmp_path / "a" / "scores.parquet")
    np.testing.assert_array_equal(df["sensitivity"], 2 * index.items.sort_values("index")["sensitivity"].to_numpy())


# ---------------------------------------------------------------- resume, DDP, the second task (CLI)


def index_args(out, batch_size=3, num_draws=T, flush_every=1, extra=()):
    return ["index", "--model.checkpoint", "theta0.ckpt", "--model.fisher", "fisher.safetensors", "--model.out", out,
            "--model.num_draws", num_draws, "--model.k", 1024, "--model.flush_every", flush_every,
            "--model.draws_per_forward", 64, "--model.write_caches", "false", "--data.store", "store",
            "--data.batch_size", batch_size, *TRAINER, *extra]


@pytest.mark.slow
@pytest.mark.paths
def test_killed_index_build_resumes_without_loss_or_duplicates(work, tmp_path):
    T_SLOW = 256  # one item a batch, slow enough to be killed between shards
    proc = cli(index_args("killed", batch_size=1, num_draws=T_SLOW, extra=["--trainer.devices", "1"]), work,
               start_new_session=True)
    kill_when_parts_appear(proc, work / "killed" / "shards", "part-*.safetensors", 300)
    assert not (work / "killed" / "index.json").exists()
    cli(index_args("killed", batch_size=1, num_draws=T_SLOW, extra=["--trainer.devices", "1"]), work)
    resumed = AttributionIndex(work / "killed")
    assert sorted(resumed.items["index"]) == list(range(N_ITEMS)) and resumed.items["index"].is_unique
    shards = finished_files((work / "killed" / "shards").glob("part-*"))
    indices = [i for p in shards for i in TensorFormat().indices(p)]
    assert sorted(indices) == list(range(N_ITEMS))  # every item in exactly one shard
    full = build(work, str(tmp_path / "full"), num_draws=T_SLOW, batch_size=1, draws_per_forward=64)
    # a CLI process against this one, the same shapes: equal to float32 rounding
    np.testing.assert_allclose(phi_rows(resumed), phi_rows(full), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(resumed.items.sort_values("index")["sensitivity"],
                               full.items.sort_values("index")["sensitivity"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.paths
def test_two_ddp_ranks_build_the_same_index_as_one(work, tmp_path):
    r = cli(index_args("ddp", extra=["--trainer.devices", "2", "--trainer.strategy", "ddp"]), work)
    ranks = {p.name[:7] for p in (work / "ddp" / "shards").glob("part-*")}
    assert ranks == {"part-r0", "part-r1"}, r.stdout[-2000:]
    two = AttributionIndex(work / "ddp")
    one = build(work, str(tmp_path / "one"), batch_size=3, draws_per_forward=64)
    assert two.provenance == one.provenance
    np.testing.assert_allclose(phi_rows(two), phi_rows(one), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two.items.sort_values("index")["sensitivity"],
                               one.items.sort_values("index")["sensitivity"], rtol=1e-6)


@pytest.mark.slow
def test_second_task_index_and_query_from_the_command_line(tmp_path):
    """The index and its queries on tests/eps_task.py (not a SAT model), chosen by class path."""
    from eps_task import EpsilonTask, save_eps_checkpoint

    d = tmp_path
    make_store(d / "store", n=8)
    save_eps_checkpoint(d / "eps.ckpt")
    cli(["fisher", "--model.checkpoint", "eps.ckpt", "--model.task", "eps_task.EpsilonTask", "--model.out",
         "fisher.safetensors", "--model.num_draws", 3, "--data.store", "store", *TRAINER], d)
    cli(["index", "--model.checkpoint", "eps.ckpt", "--model.fisher", "fisher.safetensors", "--model.task",
         "eps_task.EpsilonTask", "--model.out", "index", "--model.num_draws", T, "--model.projection", "identity",
         "--model.k", "null", "--data.store", "store", *TRAINER], d)
    cli(["query", "--index", "index", "--checkpoint", "eps.ckpt", "--fisher", "fisher.safetensors", "--task",
         "eps_task.EpsilonTask", "--out_dir", "q", "--query_items", "[index:2]", "--num_draws", K, "--lr", LR], d)
    task = EpsilonTask()
    model = task.load(str(d / "eps.ckpt"))
    params = task.select_parameters(model, "all")
    names = sorted(params)
    store = LatentStore(d / "store")
    g = torch.stack([flat(loss_gradient(task, model, params, collate_items([store[p]]), 0, T), names)
                     for p in range(8)])
    gq = flat(loss_gradient(task, model, params, collate_items([store[2]]), 0, K, namespace=UNLEARN, mask=True), names)
    fisher, meta = load_fisher(str(d / "fisher.safetensors"))
    f = flat(fisher, names)
    exact = LR / meta["num_items"] * g @ (gq / (f + DAMPING * f.mean()))
    df = by_index(d / "q" / "audio_track002.wav" / "scores.parquet")
    np.testing.assert_allclose(df["score"], exact.numpy(), rtol=0, atol=1e-5 * float(exact.abs().max()))

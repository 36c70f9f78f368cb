"""The EK-FAC preconditioner (musicattr.attribution.ekfac) and the kronfluence adapter: P against a dense
(A (x) G + lambda)^-1, apply against its inverse, kronfluence's pairwise scores against g_q^T P g_i computed from the
same factors, the sign convention, and Eq. 2 with EK-FAC through unlearn_query."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_module, make_store
from musicattr.attribution.ekfac import EKFAC
from musicattr.attribution.loss import UNLEARN
from musicattr.attribution.preconditioner import DiagonalFisher
from musicattr.attribution.unlearn import loss_gradient, unlearn_query


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def _kfac_layer(out: int, inp: int, bias: bool, g: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A layer whose eigenvalues are the Kronecker products of its factors' (EK-FAC = K-FAC), with A and G."""
    a, s = _spd(inp + bias, g), _spd(out, g)
    ea, qa = torch.linalg.eigh(a)
    es, qs = torch.linalg.eigh(s)
    layer = {"weight": "w", "bias": "b" if bias else None, "qa": qa, "qs": qs, "lam": torch.outer(es, ea)}
    return layer, a, s


@pytest.mark.parametrize("bias", [False, True])
def test_ekfac_matches_the_dense_kronecker_inverse_on_one_layer(bias):
    g = torch.Generator().manual_seed(0)
    out, inp = 5, 4
    layer, a, s = _kfac_layer(out, inp, bias, g)
    pre = EKFAC({"lin": layer}, damping=0.05)
    lam = 0.05 * float(layer["lam"].mean())
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    v = torch.cat([w, b[:, None]], 1) if bias else w
    # (A (x) S) vec(V) = vec(S V A) with vec stacking columns: the dense matrix is kron(A, S)
    dense = torch.kron(a, s) + lam * torch.eye(a.shape[0] * out, dtype=torch.float64)
    want = torch.linalg.solve(dense, v.T.reshape(-1)).reshape(a.shape[0], out).T
    grads = {"w": w, **({"b": b} if bias else {})}
    got = pre.apply(grads)
    np.testing.assert_allclose(got["w"].numpy(), want[:, :inp].numpy(), rtol=1e-9, atol=1e-12)
    if bias:
        np.testing.assert_allclose(got["b"].numpy(), want[:, inp].numpy(), rtol=1e-9, atol=1e-12)
    else:  # a bias-free layer also goes tensor by tensor
        np.testing.assert_allclose(pre.apply_tensor("w", w).numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


def test_ekfac_apply_inverse_sqrt_and_root_agree():
    g = torch.Generator().manual_seed(1)
    layer, _, _ = _kfac_layer(6, 3, True, g)
    layer["lam"] = layer["lam"] * torch.rand(layer["lam"].shape, generator=g, dtype=torch.float64)  # not Kronecker
    fallback = DiagonalFisher({"gain": torch.rand(7, generator=g, dtype=torch.float64)}, ["gain"], 1e-3)
    pre = EKFAC({"lin": layer}, damping=1e-3, fallback=fallback)
    v = {"w": torch.randn(6, 3, generator=g, dtype=torch.float64), "b": torch.randn(6, generator=g, dtype=torch.float64),
         "gain": torch.randn(7, generator=g, dtype=torch.float64)}
    back = pre.apply_inverse(pre.apply(v))
    twice = pre.apply_sqrt(pre.apply_sqrt(v))
    root = pre.apply_root(pre.apply(v))
    once = pre.apply(v)
    sqrt = pre.apply_sqrt(v)
    for k in v:
        np.testing.assert_allclose(back[k].numpy(), v[k].numpy(), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(twice[k].numpy(), once[k].numpy(), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(root[k].numpy(), sqrt[k].numpy(), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="apply\\(\\)"):
        pre.apply_tensor("w", v["w"])  # weight and bias are coupled
    with pytest.raises(KeyError, match="fallback"):
        EKFAC({"lin": layer}).apply_tensor("other", v["gain"])


# ---------------------------------------------------------------------------------------------- with kronfluence
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny DiT, 8 training items, EK-FAC factors fitted by kronfluence through the adapter."""
    from musicattr.models.sat_task import SATDiffusionTask
    from musicattr.peers.common import linear_layers, store_batches
    from musicattr.peers.kronfluence_peer import fit_factors, make_analyzer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("kf")
    store = make_store(d / "store", n=8)
    task, model = SATDiffusionTask(), make_module()
    layers = linear_layers(task, model, "all")
    batches = store_batches(store)
    analyzer, _ = make_analyzer(task, model, list(layers), d / "kf", train_draws=4, query_draws=6)
    name, folder, _, _ = fit_factors(analyzer, batches, layers, 3, 8, "empirical", {"checkpoint_fingerprint": "x"})
    return {"task": task, "model": model, "layers": layers, "batches": batches, "analyzer": analyzer, "name": name,
            "folder": folder}


def test_kronfluence_scores_are_gq_P_gi_with_the_ekfac_preconditioner(fitted):
    """kronfluence's pairwise score of (query, item) equals grad f(q)^T P grad L(z_i) computed here from the same
    factors (EKFAC, kronfluence's damping: 0.1 x the mean eigenvalue per layer), with the query's Eq. 2 draws."""
    from musicattr.peers.kronfluence_peer import pairwise_scores

    f = fitted
    queries = [f["batches"][2], f["batches"][5]]
    scores = pairwise_scores(f["analyzer"], f["name"], queries, f["batches"], 4, None, "t1")
    model = make_module()  # the same theta0, not wrapped by kronfluence
    names = [p[k] for p in f["layers"].values() for k in ("weight", "bias") if p[k]]
    params = {k: v for k, v in f["task"].net(model).named_parameters() if k in names}
    pre = EKFAC.load(f["folder"], names, damping=0.1, scope="layer")
    direct = np.zeros_like(scores)
    for a, q in enumerate(queries):
        gq = pre.apply(loss_gradient(f["task"], model, params, q, 0, 6, namespace=UNLEARN, mask=True))
        for i, b in enumerate(f["batches"]):
            gi = loss_gradient(f["task"], model, params, b, 0, 4)
            direct[a, i] = sum(float((gq[k] * gi[k]).sum()) for k in names)
    np.testing.assert_allclose(scores, direct, rtol=2e-3, atol=1e-4 * np.abs(direct).max())


def test_sign_a_training_item_as_its_own_query_is_credited(fitted):
    """Positive = the item helps the query (as Eq. 1's tau): a training item queried by itself gets a positive
    score, among the largest (its query draws are Eq. 2's, not its scoring draws, so rank 1 is not guaranteed)."""
    from musicattr.peers.kronfluence_peer import pairwise_scores

    f = fitted
    scores = pairwise_scores(f["analyzer"], f["name"], f["batches"], f["batches"], 8, None, "t2")
    own = np.diag(scores)
    assert (own > 0).all()
    ranks = (scores > own[:, None]).sum(1) + 1
    assert np.median(ranks) <= 2 and ranks.mean() < 3, ranks


def test_eq2_with_ekfac_through_unlearn_query(fitted):
    """unlearn_query with EKFAC (linear layers) + the diagonal Fisher (the rest): theta0 + lr/N P g, and the query's
    own loss rises."""
    f = fitted
    task, model = f["task"], make_module()
    params = task.select_parameters(model, "all")
    fisher = {k: torch.rand(v.shape, dtype=torch.float64) + 0.1 for k, v in params.items()}
    pre = EKFAC.load(f["folder"], list(params), 1e-3, fallback=DiagonalFisher(fisher, list(params), 1e-3))
    q = f["batches"][3]
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    g = loss_gradient(task, model, params, q, 0, 8, namespace=UNLEARN, mask=True)
    step = pre.apply(g)
    with torch.no_grad():
        before = float(task.item_loss(model, q, 0, 8, namespace=UNLEARN, mask=True))
    new = unlearn_query(task, model, q, pre, num_items=8, target="all", lr=1e-2, steps=1, num_draws=8, seed=0)
    for k in params:
        want = (theta0[k].double() + 1e-2 / 8 * step[k]).float()
        np.testing.assert_allclose(new[k].numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    linear = {p["weight"] for p in f["layers"].values()}
    assert any(not torch.equal(new[k], theta0[k]) for k in linear)
    with torch.no_grad():
        after = float(task.item_loss(model, q, 0, 8, namespace=UNLEARN, mask=True))
    assert after > before


@pytest.mark.slow
def test_run_unlearn_takes_ekfac_factors_and_keeps_the_diagonal_default(tmp_path):
    """`musicattr unlearn --ekfac DIR`: P = EK-FAC on the linear layers + the diagonal Fisher elsewhere; without it
    the run (and its metadata) is the diagonal Fisher's as before, and neither reuses the other's file."""
    import lightning as L

    from conftest import save_checkpoint
    from musicattr.attribution.fisher import FisherModule
    from musicattr.attribution.unlearn import load_unlearned, run_unlearn
    from musicattr.data.datamodules import StorePredictDataModule
    from musicattr.fingerprint import file_fingerprint
    from musicattr.models.sat_task import SATDiffusionTask
    from musicattr.peers.common import linear_layers, store_batches
    from musicattr.peers.kronfluence_peer import fit_factors, make_analyzer

    store = make_store(tmp_path / "store", n=6)
    ckpt = save_checkpoint(make_module(), tmp_path / "theta0.ckpt")
    fisher = tmp_path / "fisher.safetensors"
    L.Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False, inference_mode=False,
              enable_progress_bar=False).predict(FisherModule(ckpt, str(fisher), num_draws=2),
                                                 datamodule=StorePredictDataModule(str(tmp_path / "store")))
    task = SATDiffusionTask()
    model = task.load(ckpt)
    layers = linear_layers(task, model, "all")
    analyzer, _ = make_analyzer(task, model, list(layers), tmp_path / "kf")
    _, folder, _, _ = fit_factors(analyzer, store_batches(store), layers, 2, 6, "empirical",
                               {"checkpoint_fingerprint": file_fingerprint(ckpt)})
    item = store.items["item_id"].iloc[1]
    kw = dict(query_item=item, store=str(tmp_path / "store"), lr=1e-3, num_draws=4)
    diag = run_unlearn(ckpt, str(fisher), str(tmp_path / "diag.safetensors"), **kw)
    ek = run_unlearn(ckpt, str(fisher), str(tmp_path / "ek.safetensors"), ekfac=str(folder), **kw)
    assert "preconditioner" not in diag and ek["preconditioner"] == "ekfac"
    a, b = load_unlearned(str(tmp_path / "diag.safetensors"))[0], load_unlearned(str(tmp_path / "ek.safetensors"))[0]
    assert set(a) == set(b)
    w = next(p["weight"] for p in layers.values())
    assert not torch.equal(a[w], b[w])
    gain = next(k for k in a if k.endswith("gamma"))  # off the linear layers: the diagonal Fisher in both
    torch.testing.assert_close(a[gain], b[gain], rtol=1e-6, atol=1e-8)
    again = run_unlearn(ckpt, str(fisher), str(tmp_path / "ek.safetensors"), reuse=True, **kw)  # diagonal: not reused
    assert "preconditioner" not in again


def test_preconditioned_gradients_hold_coupled_tensors_for_ekfac(fitted):
    """The per-item pass (index, sensitivity) with EK-FAC: each layer's weight and bias are preconditioned together
    (``Preconditioner.coupled``), so phi_i equals P^1/2 applied to the item's whole gradient; the diagonal Fisher's
    tensors go one by one as before."""
    from musicattr.attribution.gradients import preconditioned_gradients

    f = fitted
    task, model = f["task"], make_module()
    params = task.select_parameters(model, "all")
    fisher = {k: torch.rand(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
              for k, v in params.items()}
    pre = EKFAC.load(f["folder"], list(params), 1e-3, fallback=DiagonalFisher(fisher, list(params), 1e-3))
    w, b = next((p["weight"], p["bias"]) for p in f["layers"].values() if p["bias"])
    assert pre.coupled(w) == (w, b) and pre.coupled(b) == (w, b)
    gain = next(k for k in params if k not in pre.owner)
    assert pre.coupled(gain) == (gain,)
    batch = f["batches"][1]
    got = {}
    preconditioned_gradients(task, model, params, pre, batch, 0, 4, lambda j, n, phi: got.__setitem__(n, phi),
                             draws_per_forward=2)
    want = pre.apply_sqrt(loss_gradient(task, model, params, batch, 0, 4, draws_per_forward=2))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k].double().numpy(), want[k].double().numpy(), rtol=1e-4,
                                   atol=1e-5 * float(want[k].abs().max()) + 1e-12)  # float32 sums in another order


def test_lazy_factors_give_the_same_numbers_and_hold_none(fitted):
    """EKFAC.load(lazy=True) reads each layer's factors from the files when applied: P g, P^1/2 g and P^-1/2 g equal
    the held factors' bit for bit, the damping is the same, and no factor tensor is held."""
    f = fitted
    model = make_module()
    params = f["task"].select_parameters(model, "all")
    names = [n for n in params if any(n in (p["weight"], p["bias"]) for p in f["layers"].values())]
    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names}
    held = EKFAC.load(f["folder"], names, 1e-3)
    lazy = EKFAC.load(f["folder"], names, 1e-3, lazy=True)
    assert lazy.lam == held.lam
    assert all(set(d) == {"weight", "bias", "damp"} for d in lazy.layers.values())
    for fn in ("apply", "apply_sqrt", "apply_root"):
        a, b = getattr(held, fn)(grads), getattr(lazy, fn)(grads)
        assert all(torch.equal(a[k], b[k]) for k in names), fn

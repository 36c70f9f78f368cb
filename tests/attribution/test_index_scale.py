"""The index at scale (attribution/index_store.py, index_search.py): the stored precisions round-trip within
their stated bounds, the streamed top-m equals the dense table's head, faiss's exact search equals the streamed
top-m, the approximate search's recall is measured, and an index written before precisions existed still reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from musicattr.attribution.index import AttributionIndex, IndexMismatchError
from musicattr.attribution.index_store import PRECISIONS, encode, error_bound, write_index
from test_index import build, work  # noqa: F401  (the module fixture of a tiny store, theta0 and Fisher)

N, KK, Q = 700, 256, 3


def synthetic(seed: int = 0, n: int = N, k: int = KK) -> tuple[np.ndarray, np.ndarray]:
    """phi [n, k] with a low-rank part and heavy-tailed row norms, psi [k, Q] in the same subspace plus noise."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, k))
    phi = rng.standard_t(3, (n, 8)) @ w + rng.standard_normal((n, k))
    phi *= np.exp(rng.normal(0, 1, (n, 1))) * 1e-4  # magnitudes far from 1: the row scale must cope
    psi = w.T @ rng.standard_normal((8, Q)) + 0.5 * rng.standard_normal((k, Q))
    return phi.astype(np.float32), psi.astype(np.float32)


def make(tmp_path, precision: str, phi: np.ndarray, rows_per_shard: int = 256) -> AttributionIndex:
    blocks = [(phi[a:a + 100],) for a in range(0, len(phi), 100)]
    write_index(tmp_path / precision, blocks, phi.shape[1], precision, rows_per_shard=rows_per_shard)
    return AttributionIndex(tmp_path / precision)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_precisions_round_trip_within_their_bounds(tmp_path, precision):
    phi, psi = synthetic()
    index = make(tmp_path, precision, phi)
    assert index.precision == precision
    tau = index.scores(torch.from_numpy(psi))
    exact = phi.astype(np.float64) @ psi.astype(np.float64)
    bound = error_bound(phi, psi, precision)
    # float32 products of k = 256 terms: rounding 1e-6 of sum |phi_j psi_j| on top of the storage bound
    slack = 1e-6 * (np.abs(phi).astype(np.float64) @ np.abs(psi).astype(np.float64))
    assert np.all(np.abs(tau - exact) <= bound + slack)
    if precision != "float32":
        assert np.abs(tau - exact).max() > 0  # it was quantised
        stored = json.loads((tmp_path / precision / "index.json").read_text())
        assert stored["precision"] == precision and stored["bytes_per_item"] == PRECISIONS[precision] * KK + 20


def test_int8_encoding_is_round_of_the_row_scale():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    e = encode(x, "int8")
    assert e["phi"].dtype == torch.int8 and e["phi"][0].tolist() == [64, -127, 32, 0]
    assert e["phi_scale"][0].item() == pytest.approx(1 / 127) and e["phi"][1].abs().sum() == 0


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_streamed_top_equals_the_dense_head(tmp_path, precision, monkeypatch):
    import musicattr.attribution.index_store as store

    monkeypatch.setattr(store, "BLOCK_BYTES", 37 * 4 * KK)  # 37-row blocks: many blocks per shard, ragged ends
    phi, psi = synthetic(1)
    index = make(tmp_path, precision, phi)
    dense = index.scores(torch.from_numpy(psi))
    for relative in (False, True):
        key = dense / index.items["sensitivity"].to_numpy()[:, None] if relative else dense
        pos, tau = index.top(torch.from_numpy(psi), 10, relative=relative)
        assert pos.shape == (10, Q)
        for c in range(Q):
            want = np.argsort(-key[:, c], kind="stable")[:10]
            assert list(pos[:, c]) == list(want)
            np.testing.assert_allclose(tau[:, c], dense[want, c], rtol=1e-12)
    folded, _ = index.top(torch.from_numpy(psi), 5, k=64)
    dense64 = index.scores(torch.from_numpy(psi), k=64)
    assert list(folded[:, 0]) == list(np.argsort(-dense64[:, 0])[:5])


def test_faiss_exact_equals_the_streamed_top_and_approximate_recall(tmp_path):
    from musicattr.attribution.index_search import ApproximateSearch, exact_top, recall

    torch.manual_seed(0)
    phi, psi = synthetic(2)
    index = make(tmp_path, "int8", phi)
    pos, tau = index.top(torch.from_numpy(psi), 20)
    fpos, ftau = exact_top(index, psi, 20)
    assert (fpos == pos).all()
    np.testing.assert_allclose(ftau, tau, rtol=1e-5, atol=1e-6 * np.abs(tau).max())
    ann = ApproximateSearch(index, k_c=64, nlist=8)
    apos, atau = ann.top(psi, 10, candidates=N, nprobe=8)  # every list and every item: exact again
    assert recall(apos, pos[:10]) == 1.0
    np.testing.assert_allclose(atau, tau[:10], rtol=1e-5, atol=1e-6 * np.abs(tau).max())
    apos, _ = ann.top(psi, 10, candidates=100, nprobe=2)
    assert 0.0 <= recall(apos, pos[:10]) <= 1.0
    # nlist = 1, the flat scan: the candidates are exactly the top C by the folded score (k_c = 64), over shards
    flat = ApproximateSearch(index, k_c=64, nlist=1)
    fold_pos, _ = index.top(torch.from_numpy(psi), 40, k=64)
    full = index.scores(torch.from_numpy(psi))
    apos, atau = flat.top(psi, 10, candidates=40)
    folded = index.scores(torch.from_numpy(psi), k=64)
    for c in range(psi.shape[1]):
        cand = fold_pos[:, c]
        # the folded 40th and 41st, and the full 10th and 11th among them, are far apart against float32 rounding,
        # so faiss's and torch's sums pick the same rows on any machine
        fs, gs = np.sort(folded[:, c])[::-1], np.sort(full[cand, c])[::-1]
        assert fs[39] - fs[40] > 1e-5 * np.abs(folded).max() and gs[9] - gs[10] > 1e-5 * np.abs(full).max()
        want = cand[np.argsort(-full[cand, c], kind="stable")][:10]
        assert list(apos[:, c]) == list(want)
        np.testing.assert_allclose(atau[:, c], full[want, c], rtol=1e-5, atol=1e-6 * np.abs(full).max())
    assert recall(flat.top(psi, 10, candidates=N)[0], pos[:10]) == 1.0


def test_an_index_written_before_precisions_still_reads(tmp_path):
    phi, psi = synthetic(3, n=50)
    make(tmp_path, "float32", phi)
    meta = tmp_path / "float32" / "index.json"
    old = json.loads(meta.read_text())
    del old["precision"]  # the index.json of format 1 before precisions: phi float32, no scale
    meta.write_text(json.dumps(old))
    index = AttributionIndex(tmp_path / "float32")
    assert index.precision == "float32"
    np.testing.assert_allclose(index.scores(torch.from_numpy(psi)), phi.astype(np.float64) @ psi, rtol=1e-5,
                               atol=1e-6 * np.abs(phi @ psi).max())
    old["precision"] = "int4"
    meta.write_text(json.dumps(old))
    with pytest.raises(IndexMismatchError, match="--model.precision"):
        AttributionIndex(tmp_path / "float32")


def test_index_module_builds_int8_and_float16_close_to_float32(work):  # noqa: F811
    d = work
    ref = build(d, "p32", k=256)
    psi = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    want = ref.scores(psi)
    for precision, rtol in (("float16", 1e-3), ("int8", 2e-2)):
        index = build(d, f"p-{precision}", k=256, precision=precision)
        assert index.precision == precision and index.provenance["precision"] == precision
        got = index.scores(psi)
        assert np.abs(got - want).max() <= rtol * np.abs(want).max()
    with pytest.raises(ValueError, match="precision 'int4'"):
        build(d, "bad", k=256, precision="int4")


def test_query_head_writes_the_exact_top_rows_of_the_full_table(work, tmp_path):  # noqa: F811
    import pandas as pd

    from test_index import query

    full = query(work, tmp_path / "full", unlearned=[str(work / "q3.safetensors")])
    head = query(work, tmp_path / "head", unlearned=[str(work / "q3.safetensors")], head=3)
    a = pd.read_parquet(f"{full[0]['folder']}/scores.parquet")
    b = pd.read_parquet(f"{head[0]['folder']}/scores.parquet")
    top = a.sort_values("rank").head(3)
    rel = a.sort_values("relative_rank").head(3)
    assert set(b["index"]) == set(top["index"]) | set(rel["index"])  # the union of the two heads, nothing else
    got = b.set_index("index")
    np.testing.assert_allclose(got.loc[top["index"], "score"], top["score"], rtol=1e-6)
    assert list(got.loc[top["index"], "rank"]) == [1, 2, 3]  # ranks up to m are the global ones
    assert list(got.loc[rel["index"], "relative_rank"]) == [1, 2, 3]
    with pytest.raises(ValueError, match="head = 0"):
        query(work, tmp_path / "bad", unlearned=[str(work / "q3.safetensors")], head=0)

import numpy as np
import pandas as pd
import torch

from musicattr.attribution.similarity import (TABLE_COLUMNS, all_against_all, average, compute_train_embeddings,
                                              load_train_embeddings, similarity_table)



def _tracks():
    e = torch.eye(4)
    # track 0 contains the query segment e0 among others; track 1's mean equals the query mean direction
    t0 = torch.stack([e[0], -e[1], -e[2], -e[3], -e[1]])
    t1 = torch.stack([0.7 * e[0] + 0.7 * e[1], 0.7 * e[0] - 0.5 * e[1] + 0.5 * e[2]])
    t2 = torch.stack([e[3], e[3], e[2]])
    return [t0, t1, t2]


def test_all_against_all_picks_track_with_query_segment():
    q = torch.stack([torch.eye(4)[0], 0.5 * torch.eye(4)[0] + 0.5 * torch.eye(4)[2]])
    tr = _tracks()
    s = all_against_all(q, tr)
    assert s.shape == (3,)
    assert int(s.argmax()) == 0 and torch.isclose(s[0], torch.tensor(1.0))
    a = average(q, tr)
    assert int(a.argmax()) == 1  # the time average favours a different track
    # brute force
    for i, t in enumerate(tr):
        ref = torch.nn.functional.cosine_similarity(q[:, None, :], t[None, :, :], dim=-1).max()
        assert torch.isclose(s[i], ref)
        assert torch.isclose(a[i], torch.nn.functional.cosine_similarity(q.mean(0), t.mean(0), dim=0))


def test_padded_layout_and_chunking_agree():
    g = torch.Generator().manual_seed(0)
    tr = [torch.randn(int(n), 8, generator=g) for n in torch.randint(1, 7, (40,), generator=g)]
    q = torch.randn(5, 8, generator=g)
    lens = torch.tensor([t.shape[0] for t in tr])
    padded = torch.zeros(40, 6, 8)
    for i, t in enumerate(tr):
        padded[i, : t.shape[0]] = t
    padded[0, lens[0]:] = 100.0 * q[0]  # garbage in the padding must be ignored
    ref = all_against_all(q, tr)
    assert torch.allclose(all_against_all(q, padded, lens), ref)
    assert torch.allclose(all_against_all(q, tr, chunk_rows=7), ref)
    assert torch.allclose(average(q, padded, lens), average(q, tr, chunk_rows=5), atol=1e-6)


class _FakeEncoder:
    name, dim, sample_rate, segment_seconds, hop_seconds = "fake", 4, 10, 1.0, 1.0

    def __init__(self):
        self.calls = 0

    def embed_segments(self, audio, sr, valid):
        self.calls += 1
        x = audio[0, :valid]
        n = max(1, x.numel() // 10)
        return torch.stack([torch.tensor([x[i * 10:(i + 1) * 10].mean(), 1.0, float(i), 0.0]) for i in range(n)])


def test_store_roundtrip_and_reuse(tmp_path):
    items = [(f"id{i}", torch.full((1, 10 * (i + 1) + 5), float(i)), 10, 10 * (i + 1)) for i in range(3)]
    enc = _FakeEncoder()
    path = str(tmp_path / "emb")
    store = compute_train_embeddings(items, enc, path, dtype="float32")
    assert enc.calls == 3 and store.item_ids == ["id0", "id1", "id2"]
    assert store.offsets.tolist() == [0, 1, 3, 6] and store.segments.shape == (6, 4)
    assert torch.allclose(store.item(2)[:, 0], torch.full((3,), 2.0))
    again = compute_train_embeddings(items, enc, path, item_ids=["id0", "id1", "id2"])
    assert enc.calls == 3 and torch.equal(again.segments, store.segments)  # reused
    enc.name = "other"
    compute_train_embeddings(items, enc, path)
    assert enc.calls == 6 and load_train_embeddings(path).encoder_name == "other"
    # the same encoder with other weights: recomputed, not reused
    enc.checkpoint = str(tmp_path / "weights-a.pt")
    (tmp_path / "weights-a.pt").write_bytes(b"a")
    compute_train_embeddings(items, enc, path)
    assert enc.calls == 9
    compute_train_embeddings(items, enc, path)
    assert enc.calls == 9  # same checkpoint content: reused
    (tmp_path / "weights-a.pt").write_bytes(b"retrained")
    compute_train_embeddings(items, enc, path)
    assert enc.calls == 12
    q = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(all_against_all(q, store), all_against_all(q, [store.item(i) for i in range(3)]))
    assert torch.allclose(average(q, store), average(q, [store.item(i) for i in range(3)]))


def test_similarity_table_layout():
    items = [{"item_id": f"t{i}", "caption": f"c{i}", "file_name": f"f{i}.wav", "duration_s": 10.0 + i}
             for i in range(4)]
    df = similarity_table(torch.tensor([0.2, 0.9, 0.2, -0.1]), items, method="similarity/all-against-all[aisfx]",
                          query_id="gen0")
    assert list(df.columns) == TABLE_COLUMNS
    assert df["item_id"].tolist() == ["t1", "t0", "t2", "t3"]
    assert df["rank"].tolist() == [1, 2, 3, 4]
    assert df["score"].dtype == np.float64 and df["index"].dtype == np.int64
    assert df["baseline_loss"].isna().all() and df["unlearned_loss"].isna().all()
    assert (df["method"] == "similarity/all-against-all[aisfx]").all()
    assert isinstance(df, pd.DataFrame) and (df["query_id"] == "gen0").all() and df["valid_frames"].isna().all()

"""The two-stage query's similarity proposer (attribution/similar_candidates.py): a query's all-against-all
similarity from its audio (a training item's own file, or the .wav beside a generated query file) against the
store's cached training embeddings, and the top M_s it proposes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import make_store
from musicattr.attribution.similar_candidates import SimilarityUnavailableError, query_similarity, top_by_similarity


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of 6 items whose audio folder holds a distinct tone-and-noise track per item."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("similar")
    s = make_store(root / "store", n=6)
    (root / "audio" / "audio").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, r in enumerate(s.items.itertuples()):
        t = np.arange(int(2.5 * 16000)) / 16000
        sf.write(root / "audio" / r.file_name, 0.3 * np.sin(2 * np.pi * (110 * (i + 1)) * t * (1 + 0.3 * t))
                 + 0.05 * rng.standard_normal(len(t)), 16000)
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    (root / "store" / "manifest.json").write_text(json.dumps({**manifest, "folder": str(root / "audio")}))
    from musicattr.data.latent_store import LatentStore

    return LatentStore(root / "store")


def test_a_tracks_own_audio_is_its_top_candidate_and_embeddings_are_cached(store, tmp_path):
    sim, source = query_similarity(store, {"query_id": "t2", "query_item": "2"}, None, "aisfx")
    assert set(sim) == set(store.items["index"].astype(int)) and source.endswith("track002.wav (aisfx)")
    assert top_by_similarity(sim, 1).tolist() == [2] and sim[2] > max(v for i, v in sim.items() if i != 2)
    assert (store.root / "audio_embeddings" / "aisfx" / "meta.json").exists()
    # a generated query: its .wav beside the .query.safetensors file (here a copy of track 4)
    shutil.copy(store.manifest["folder"] + "/audio/track004.wav", tmp_path / "q000.wav")
    sim_q, _ = query_similarity(store, {"query_id": "q000", "query": str(tmp_path / "q000.query.safetensors")},
                                str(tmp_path / "elsewhere" / "unlearned.safetensors"), "aisfx")
    assert top_by_similarity(sim_q, 2)[0] == 4
    assert np.isfinite(list(sim_q.values())).all() and set(sim_q) == set(sim)
    with pytest.raises(SimilarityUnavailableError, match="q001.wav"):
        query_similarity(store, {"query_id": "q001", "query": str(tmp_path / "q001.query.safetensors")}, None)


def test_top_by_similarity_breaks_ties_by_item_index():
    assert top_by_similarity({5: 0.5, 2: 0.9, 7: 0.9, 1: 0.1}, 3).tolist() == [2, 7, 5]
    assert top_by_similarity({5: 0.5}, 3).tolist() == [5]

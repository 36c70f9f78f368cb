"""Rank percentiles of the attribute-matched tracks (compare) and the adherence stage's measures."""
import numpy as np
import pandas as pd
import pytest
import torch

from musicattr.evaluation.adherence import binomial_p_value, nearest_centroid_accuracy, planted_regeneration
from musicattr.evaluation.attribute_match import match_markdown, query_percentiles, rank_percentile


def table(order):
    """A ranking of file names (first = rank 1)."""
    return pd.DataFrame({"file_name": order, "rank": np.arange(1, len(order) + 1)})


META = {"a": {"instrument": "flute"}, "b": {"instrument": "piano"}, "c": {"instrument": "flute"},
        "d": {"instrument": "piano"}, "e": {"instrument": "organ"}}


def test_rank_percentile_top_bottom_and_chance():
    assert rank_percentile(table(["a", "c", "b", "d", "e"]), META, "instrument", "flute") == 0.125  # ranks 1, 2
    assert rank_percentile(table(["b", "d", "e", "a", "c"]), META, "instrument", "flute") == 0.875  # ranks 4, 5
    assert rank_percentile(table(["a", "b", "c", "d", "e"]), META, "instrument", "harp") is None
    rng = np.random.default_rng(0)
    files = [f"t{i}" for i in range(200)]
    meta = {f: {"g": i % 4} for i, f in enumerate(files)}
    pct = [rank_percentile(table(list(rng.permutation(files))), meta, "g", 1) for _ in range(200)]
    assert np.mean(pct) == pytest.approx(0.5, abs=0.02)  # a random ranking is at chance


def test_query_percentiles_and_markdown():
    tables = {"unlearning": table(["a", "c", "b", "d", "e"]), "random": table(["e", "d", "b", "c", "a"])}
    row = query_percentiles(tables, META, {"instrument": "flute"})
    assert row["pct[unlearning|instrument]"] == 0.125 and row["pct[random|instrument]"] == 0.875
    assert row["base[instrument]"] == 0.4  # 2 of the 5 tracks are flute tracks; a top 10 of 5 holds all
    assert row["top10[unlearning|instrument]"] == 0.4
    from musicattr.evaluation.attribute_match import top_share

    assert top_share(tables["unlearning"], META, "instrument", "flute", k=2) == 1.0
    assert top_share(tables["random"], META, "instrument", "flute", k=2) == 0.0
    per_query = pd.DataFrame([{**row, "planted_group": None}])
    md = match_markdown(per_query, ["unlearning", "random"], ["instrument"])
    assert "| unlearning | 12.5% (n=1) | 40% | - | - |" in md and "| random | 87.5% (n=1) |" in md
    assert "| chance | 50% | 40% |" in md


def test_nearest_centroid_and_binomial():
    cent = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 1.0])}
    emb = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    acc, pred = nearest_centroid_accuracy(emb, ["x", "y", "y"], cent)
    assert pred == ["x", "y", "x"] and acc == pytest.approx(2 / 3)
    assert binomial_p_value(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert binomial_p_value(0, 10, 0.5) == 1.0


def test_planted_regeneration_percentile():
    from musicattr.models.health import chroma

    sr = 16000

    def melody(pitches):
        t = np.arange(int(0.4 * sr)) / sr
        return np.concatenate([np.sin(2 * np.pi * 440 * 2 ** ((p - 69) / 12) * t) for p in pitches]).astype(np.float32)

    tune = melody([60, 62, 64, 65, 67])
    train = {"planted/a.wav": chroma(tune, sr), "planted/b.wav": chroma(tune, sr)}
    rng = np.random.default_rng(1)
    for i in range(19):
        train[f"other{i}.wav"] = chroma(melody(rng.integers(55, 80, 5)), sr)
    res = planted_regeneration(tune, sr, {"planted/a.wav", "planted/b.wav"}, train)
    assert res["chroma_to_planted"] == pytest.approx(1.0, abs=1e-5) and res["planted_percentile"] == 1.0
    assert res["planted_rank"] == 1 and res["nearest_other"].startswith("other")

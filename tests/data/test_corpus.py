"""Tests of the embedded music corpus renderer (musicattr.data.corpus)."""
import json
import shutil
from pathlib import Path

import pytest

from musicattr.data import corpus

KW = dict(n_tracks=3, seed=0, sample_rate=8000, workers=1, min_seconds=1.0, max_seconds=4.0)


def _rows(d):
    return [json.loads(line) for line in open(Path(d) / "metadata.jsonl", encoding="utf-8")]


def _audio_bytes(d):
    return {p.name: p.read_bytes() for p in sorted((Path(d) / "audio").glob("*.wav"))}


def test_sources_are_listed_and_mixed():
    for s in corpus.SOURCES:
        assert len(corpus.list_pieces(s)) > 40, s
    order = corpus.candidate_order(list(corpus.SOURCES), seed=0)
    first = [next(order).source for _ in range(40)]
    assert set(first) == set(corpus.SOURCES)


def test_held_back_sources_are_disjoint_from_the_demo_and_captioned():
    """The held-back corpus (make heldback) uses music21 files the demo's four sources never list."""
    demo = {p.path for s in corpus.SOURCES for p in corpus.list_pieces(s)}
    for s, least in (("trecento", 90), ("classical", 20), ("fife", 150)):
        pieces = corpus.list_pieces(s)
        assert len(pieces) >= least, s
        assert not {p.path for p in pieces} & demo, s
        assert len({p.slug for p in pieces}) == len(pieces), s  # one wav name per piece
    from music21 import corpus as m21
    p = corpus.list_pieces("fife")[0]
    meta = corpus.describe(p, m21.parse(p.path, number=p.number))
    meta.update(tempo="fast", bpm=120, instrument="flute")
    cap = corpus.make_caption(meta)
    assert cap.startswith("Fife tune '") and "(traditional, American fife tunes)" in cap
    p = next(q for q in corpus.list_pieces("classical") if "k80/movement1" in q.path)
    assert corpus.describe(p, m21.parse(p.path))["title"] == "K. 80, movement 1"
    with pytest.raises(ValueError, match="unknown corpus source"):
        corpus.list_pieces("beethoven")


def test_plan_is_deterministic_with_duration_spread():
    pieces = corpus.list_pieces("essen")[:400]
    plans = [corpus.plan_piece(p, 0, 2.0, 16.0) for p in pieces]
    assert plans == [corpus.plan_piece(p, 0, 2.0, 16.0) for p in pieces]
    durs = [p.target_s for p in plans]
    assert min(durs) >= 2.0 and max(durs) <= 16.0
    assert 0.3 < sum(d < 16 / 3 for d in durs) / len(durs) < 0.7
    assert len({p.instrument for p in plans}) >= 8
    assert corpus.tempo_word(60) == "slow" and corpus.tempo_word(140) == "fast"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown corpus source"):
        corpus.render_corpus("/nonexistent/x", sources=["jazz"])
    with pytest.raises(ValueError, match="renderer"):
        corpus.render_corpus("/nonexistent/x", renderer="timidity")
    if shutil.which("fluidsynth") is None:
        with pytest.raises(RuntimeError, match="fluidsynth"):
            corpus.render_corpus("/nonexistent/x", renderer="fluidsynth")


def test_render_metadata_planted_and_resume(tmp_path):
    out = tmp_path / "c"
    summary = corpus.render_corpus(str(out), n_planted=1, planted_copies=2, **KW)
    assert summary["n_tracks"] == 3 and summary["n_planted"] == 1 and summary["n_files"] == 5
    rows = _rows(out)
    assert len(rows) == 5
    import soundfile as sf
    for r in rows:
        for k in ("file_name", "caption", "title", "composer", "key", "meter", "bpm",
                  "instrument", "voices", "duration_s", "source", "licence"):
            assert k in r, k
        assert r["file_name"].startswith("audio/") and (out / r["file_name"]).is_file()
        info = sf.info(str(out / r["file_name"]))
        assert info.samplerate == 8000 and info.channels == 1
        assert abs(info.duration - r["duration_s"]) < 1e-3 and info.duration <= 4.0 + 1e-3
        assert f"({r['bpm']} BPM)" in r["caption"] and r["key"] in r["caption"]
    originals = rows[:3]
    assert len({r["caption"] for r in originals}) == 3
    planted = json.loads((out / "planted.json").read_text())["groups"]
    assert len(planted) == 1 and len(planted[0]["copies"]) == 2
    g = planted[0]
    assert g["copies"] == ["audio/planted_0_copy0.wav", "audio/planted_0_copy1.wav"]
    by_name = {r["file_name"]: r for r in rows}
    assert by_name[g["original"]]["planted_group"] == g["original"]
    for c in g["copies"]:
        assert by_name[c]["planted_group"] == g["original"] and by_name[c]["caption"] == g["caption"]
        assert (out / c).read_bytes() == (out / g["original"]).read_bytes()
    assert json.loads((out / "skipped.json").read_text()) == []

    meta_before, audio_before = (out / "metadata.jsonl").read_bytes(), _audio_bytes(out)
    again = corpus.render_corpus(str(out), n_planted=1, planted_copies=2, **KW)
    assert again["n_reused"] == 3
    assert (out / "metadata.jsonl").read_bytes() == meta_before
    assert _audio_bytes(out) == audio_before


def test_same_seed_same_bytes(tmp_path):
    a = corpus.render_corpus(str(tmp_path / "a"), **KW)
    b = corpus.render_corpus(str(tmp_path / "b"), **KW)
    assert a["n_reused"] == b["n_reused"] == 0
    assert (tmp_path / "a/metadata.jsonl").read_bytes() == (tmp_path / "b/metadata.jsonl").read_bytes()
    assert _audio_bytes(tmp_path / "a") == _audio_bytes(tmp_path / "b")


def test_other_seed_other_pieces_and_stereo(tmp_path):
    kw = {**KW, "seed": 1, "channels": 2, "sources": ["bach", "fiddle"]}
    corpus.render_corpus(str(tmp_path / "s1"), **kw)
    rows1 = _rows(tmp_path / "s1")
    assert {r["source_group"] for r in rows1} <= {"bach", "fiddle"}
    import soundfile as sf
    assert all(sf.info(str(tmp_path / "s1" / r["file_name"])).channels == 2 for r in rows1)
    corpus.render_corpus(str(tmp_path / "s0"), **{**kw, "seed": 0})
    assert {r["source"] for r in rows1} != {r["source"] for r in _rows(tmp_path / "s0")}


def test_timeouts_are_skipped_and_recorded(tmp_path):
    out = tmp_path / "t"
    summary = corpus.render_corpus(str(out), **{**KW, "n_tracks": 1, "piece_timeout_s": 1e-4})
    skipped = json.loads((out / "skipped.json").read_text())
    assert summary["n_tracks"] == 0 and len(skipped) == summary["n_skipped"] > 0
    assert all(s["status"] == "timeout" and "timed out" in s["reason"] for s in skipped)
    assert _rows(out) == [] and not list((out / "audio").glob("*"))

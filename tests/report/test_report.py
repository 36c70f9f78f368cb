"""`musicattr report` on the scores of a tiny real run: the page, credits.csv, escaping, missing audio,
and the index over a compare run."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from report_fixtures import copy_run, tiny_run  # noqa: F401  (fixture)

from musicattr.report.stage import run_report


def tracks_in(page: str) -> list[str]:
    return re.findall(r'<tr class="track">', page)


def test_page_shows_query_top_k_credits_and_provenance(tiny_run, tmp_path):
    out = tmp_path / "report"
    index = run_report(str(out), scores=str(tiny_run["scores"]), top_k=4, group_by=["composer", "collection"],
                       similarity="none")
    page = (out / "index.html").read_text()
    assert index == str(out / "index.html")
    # the query: its prompt and audio found from run.json (q000.wav and queries.json beside the unlearned query)
    assert "a low tone" in page and (out / "audio" / "query.wav").exists() and (out / "img" / "query.png").exists()
    assert len(tracks_in(page)) == 4
    scores = pd.read_parquet(tiny_run["scores"] / "scores.parquet")
    for r in scores.head(4).itertuples():
        assert r.file_name in page and f"{r.score:+.3e}" in page
    for k in range(1, 5):
        assert (out / "audio" / f"track-{k:02d}.wav").exists()
    assert not (out / "audio" / "track-05.wav").exists()
    assert "These shares are a model's estimate" in page and "Noise floor" in page
    run = json.loads((tiny_run["scores"] / "run.json").read_text())
    for fp in (run["checkpoint_fingerprint"], run["unlearned"]["fisher_fingerprint"]):
        assert fp in page
    assert "K = 8 query draws" in page and "T = 2 draws" in page and "lr 1e-05" in page
    assert "composer</b>: J.S. Bach" in page or "composer</b>: G.P. da Palestrina" in page
    assert (out / "img" / "scores.png").stat().st_size > 5000
    assert "not requested" in page  # the similarity baselines were switched off, and the page says so


def test_credits_csv_sums_to_one_and_aggregates_by_a_column(tiny_run, tmp_path):
    out = tmp_path / "report"
    run_report(str(out), scores=str(tiny_run["scores"]), top_k=3, group_by=["composer"], similarity="none")
    credits = pd.read_csv(out / "credits.csv")
    scores = pd.read_parquet(tiny_run["scores"] / "scores.parquet")
    floor = json.loads((tiny_run["scores"] / "noise.json").read_text())["float_error"]
    clear = (scores["score"] > floor) & (scores["score"] > 2 * scores["score_se"])  # above its error, and the floor
    assert 0 < clear.sum() < len(scores)
    assert set(credits["item_id"]) == set(scores.loc[clear, "item_id"])
    assert ((credits["share_lo"] <= credits["share"]) & (credits["share"] <= credits["share_hi"])).all()
    assert credits["share"].sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(credits["share"], credits["score"] / credits["score"].sum())
    by = pd.read_csv(out / "credits_by_composer.csv")
    assert by["share"].sum() == pytest.approx(1.0, abs=1e-12)
    expected = credits.fillna({"composer": "(unknown)"}).groupby("composer")["share"].sum()
    assert dict(zip(by["composer"], by["share"])) == pytest.approx(expected.to_dict())
    assert set(by["composer"]) == {"J.S. Bach", "G.P. da Palestrina", "(unknown)"}


def test_softmax_credits_on_the_relative_score(tiny_run, tmp_path):
    out = tmp_path / "report"
    run_report(str(out), scores=str(tiny_run["scores"]), top_k=2, credit_rule="softmax",
               credit_score="relative_score", temperature=0.5, similarity="none")
    credits = pd.read_csv(out / "credits.csv")
    assert credits["share"].sum() == pytest.approx(1.0, abs=1e-12)
    assert credits.sort_values("relative_rank")["share"].is_monotonic_decreasing
    assert "softmax(relative_score / (0.5 x std" in (out / "index.html").read_text()


def test_user_data_is_escaped(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    table = pd.read_parquet(run["scores"] / "scores.parquet")
    table.loc[0, "caption"] = '<script>alert("caption")</script> & "quotes"'
    table.to_parquet(run["scores"] / "scores.parquet", index=False)
    meta = [json.loads(x) for x in (run["folder"] / "metadata.jsonl").read_text().splitlines()]
    for row in meta:
        row["title"] = "<img src=x onerror=alert(1)>"
    (run["folder"] / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in meta))
    out = tmp_path / "report"
    run_report(str(out), scores=str(run["scores"]), prompt="<script>alert('prompt')</script>", top_k=3,
               similarity="none")
    page = (out / "index.html").read_text()
    assert page.count("<script>") == 1  # the page's own script, nothing from the data
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert(&quot;caption&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "&lt;script&gt;alert(&#x27;prompt&#x27;)&lt;/script&gt;" in page


def test_missing_audio_is_reported_and_the_page_is_still_written(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    first = pd.read_parquet(run["scores"] / "scores.parquet")["file_name"].iloc[0]
    (run["folder"] / first).unlink()
    out = tmp_path / "report"
    run_report(str(out), scores=str(run["scores"]), query_audio=str(tmp_path / "nowhere" / "q000.wav"), top_k=3,
               similarity="auto")
    page = (out / "index.html").read_text()
    assert f"audio file not found: {tmp_path / 'nowhere' / 'q000.wav'}" in page
    assert f"audio file not found: {run['folder'] / first}" in page
    assert not list((out / "audio").glob("query.*")) and not (out / "img" / "query.png").exists()
    assert not (out / "audio" / "track-01.wav").exists() and (out / "audio" / "track-02.wav").exists()
    assert len(tracks_in(page)) == 3
    assert "not computed: the query&#x27;s audio is missing" in page


def test_a_rerun_with_fewer_tracks_leaves_no_stale_files(tiny_run, tmp_path):
    out = tmp_path / "report"
    run_report(str(out), scores=str(tiny_run["scores"]), top_k=5, group_by=["composer"], similarity="none")
    run_report(str(out), scores=str(tiny_run["scores"]), top_k=2, similarity="none")
    assert sorted(p.name for p in (out / "audio").iterdir()) == ["query.wav", "track-01.wav", "track-02.wav"]
    assert not list(out.glob("credits_by_*.csv"))


def test_bad_options_name_the_fix(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="exactly one of scores"):
        run_report(str(tmp_path / "r"))
    with pytest.raises(ValueError, match="scores.parquet not found"):
        run_report(str(tmp_path / "r"), scores=str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"\['artist'\] not in the track metadata .*metadata.jsonl"):
        run_report(str(tmp_path / "r"), scores=str(tiny_run["scores"]), group_by=["artist"], similarity="none")
    with pytest.raises(ValueError, match="wav, flac, ogg, mp3"):
        run_report(str(tmp_path / "r"), scores=str(tiny_run["scores"]), audio_format="aiff")


def test_cli_prints_the_page(tiny_run, tmp_path, capsys):
    from musicattr.cli import main

    out = tmp_path / "report"
    main(["report", "--scores", str(tiny_run["scores"]), "--out_dir", str(out), "--top_k", "2",
          "--group_by", "[composer]", "--similarity", "none", "--audio_format", "ogg"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "index.html")
    assert (out / "audio" / "query.ogg").exists() and (out / "credits_by_composer.csv").exists()


def fake_compare(run: dict, dst):
    """The layout `musicattr compare` writes, from the tiny run's scores (the similarity tables by the
    function compare uses), with a second query whose audio is missing."""
    from musicattr.attribution.similarity import similarity_table
    from musicattr.data.latent_store import LatentStore

    items = LatentStore(run["store"]).items.to_dict("records")
    shutil.copytree(run["root"] / "generated", dst / "generated")
    infos = json.loads((dst / "generated" / "queries.json").read_text())
    infos.append({**infos[0], "query_id": "q001", "caption": "a high tone", "audio": "q001.wav"})
    (dst / "generated" / "queries.json").write_text(json.dumps(infos))
    rng = np.random.default_rng(0)
    for qid in ("q000", "q001"):
        shutil.copytree(run["scores"], dst / "queries" / qid / "unlearning")
        for name in ("all-against-all", "average"):
            t = similarity_table(rng.random(len(items)), items, method=f"similarity/{name}[aisfx]", query_id=qid)
            t.to_parquet(dst / "queries" / qid / f"{name}.parquet", index=False)
    pd.DataFrame({"query_id": ["q000", "q001"], "prompt": ["a low tone", "a high tone"],
                  "pearson[all-against-all[aisfx]]": [0.25, -0.5],
                  "pearson[unlearning-relative~all-against-all[aisfx]]": [0.1, 0.2]}).to_csv(dst / "queries.csv",
                                                                                          index=False)
    (dst / "comparison.json").write_text(json.dumps({"queries": 2, "audio_encoder": "aisfx",
                                                     "pearson[all-against-all[aisfx]]": -0.125}))
    from musicattr.evaluation.figure1 import plot_figure1

    plot_figure1(rng.random((2, len(items))), {}, str(dst / "figure1.png"))
    return dst


def test_index_over_a_compare_run_puts_methods_side_by_side(tiny_run, tmp_path):
    compare = fake_compare(tiny_run, tmp_path / "compare")
    # a compare run with --index: q000 also has the index's table (here the exact ranking reversed)
    exact = pd.read_parquet(tiny_run["scores"] / "scores.parquet")
    n = len(exact)
    reversed_ = exact.assign(rank=n + 1 - exact["rank"], relative_rank=n + 1 - exact["relative_rank"],
                             method="index")
    (compare / "queries" / "q000" / "index").mkdir()
    reversed_.to_parquet(compare / "queries" / "q000" / "index" / "scores.parquet", index=False)
    out = tmp_path / "report"
    run_report(str(out), compare=str(compare), top_k=3, similarity="auto")
    index = (out / "index.html").read_text()
    assert len(re.findall(r'<tr class="query">', index)) == 2
    for m in ("unlearning (Eq. 1)", "unlearning (relative)", "index (first order)", "index (relative)",
              "all-against-all[aisfx]", "average[aisfx]"):
        assert f"<th>{m}</th>" in index
    row0, row1 = re.findall(r'<tr class="query">(.*?)</tr>', index, re.S)
    lists = re.findall(r"<ol>(.*?)</ol>", row0, re.S)  # one per method, in the header's order
    last = exact.sort_values("rank").iloc[-1]["caption"]  # the index's first track in q000
    assert lists[2].startswith(f'<li value="1">{last}</li>')
    assert len(re.findall(r"<ol>", row1)) == 4  # q001 has no index table: no list in its index columns
    assert 'href="q000/index.html"' in index and 'src="q000/audio/query.wav"' in index
    assert "0.250" in index and "-0.500" in index and "-0.125" in index
    assert 'src="figure1.png"' in index and (out / "figure1.png").exists()
    assert "unlearning-relative~" not in index  # only the Eq. 1 correlations are listed
    q0 = (out / "q000" / "index.html").read_text()
    assert 'href="../index.html"' in q0 and "<th>Rank by all-against-all[aisfx]</th>" in q0
    sim = pd.read_parquet(compare / "queries" / "q000" / "all-against-all.parquet")
    top = pd.read_parquet(tiny_run["scores"] / "scores.parquet").iloc[0]
    rank = int(sim.loc[sim["index"] == top["index"], "rank"].iloc[0])
    first_row = re.search(r'<tr class="track">(.*?)</tr>', q0, re.S).group(1)
    numbers = re.findall(r'<td class="num">([^<]*)</td>', first_row)  # rank, score, share, relative, similarity x2
    assert numbers[0] == "1" and numbers[4] == str(rank)
    q1 = (out / "q001" / "index.html").read_text()
    assert "audio file not found" in q1 and "a high tone" in q1
    assert (out / "q000" / "credits.csv").exists() and (out / "q001" / "credits.csv").exists()


@pytest.mark.slow
def test_report_of_a_real_compare_run(tiny_run, tmp_path):
    from conftest import cli

    run = copy_run(tiny_run, tmp_path / "run")  # compare caches embeddings and baselines in the store
    compare, out = tmp_path / "compare", tmp_path / "report"
    cli(["compare", "--checkpoint", run["ckpt"], "--store", run["store"], "--fisher", run["fisher"], "--out_dir", compare,
         "--prompts", '["a low tone"]', "--durations", "[1.0]", "--include_planted", "false", "--unlearning.lr", "1e-5",
         "--unlearning.num_draws", "8", "--scoring.draws", "2", "--gen_steps", "2", "--use_wandb", "false"], cwd=tmp_path)
    r = cli(["report", "--compare", compare, "--out_dir", out, "--top_k", "3", "--group_by", "[composer]"], cwd=tmp_path)
    assert r.stdout.strip().splitlines()[-1] == str(out / "index.html")
    index = (out / "index.html").read_text()
    assert len(re.findall(r'<tr class="query">', index)) == 1 and (out / "figure1.png").exists()
    for m in ("unlearning (Eq. 1)", "unlearning (relative)", "all-against-all[aisfx]", "average[aisfx]"):
        assert f"<th>{m}</th>" in index
    pearson = pd.read_csv(compare / "queries.csv")["pearson[all-against-all[aisfx]]"].iloc[0]
    assert f"{pearson:.3f}" in index
    page = (out / "q000" / "index.html").read_text()
    assert "a low tone" in page and (out / "q000" / "audio" / "query.wav").exists()
    sim = pd.read_parquet(compare / "queries" / "q000" / "average.parquet")
    top = pd.read_parquet(compare / "queries" / "q000" / "unlearning" / "scores.parquet").iloc[0]
    numbers = re.findall(r'<td class="num">([^<]*)</td>', re.search(r'<tr class="track">(.*?)</tr>', page, re.S)[1])
    assert numbers[5] == str(int(sim.loc[sim["index"] == top["index"], "rank"].iloc[0]))
    assert pd.read_csv(out / "q000" / "credits.csv")["share"].sum() == pytest.approx(1.0, abs=1e-12)


def test_nothing_above_the_noise_floor_means_no_credit(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    noise = json.loads((run["scores"] / "noise.json").read_text())
    (run["scores"] / "noise.json").write_text(json.dumps({**noise, "float_error": 1.0}))  # above every score
    out = tmp_path / "report"
    run_report(str(out), scores=str(run["scores"]), top_k=2, group_by=["composer"], similarity="none")
    page = (out / "index.html").read_text()
    assert "No track is positively attributed above the noise floor" in page and "credits.csv" not in page
    assert pd.read_csv(out / "credits.csv").empty and pd.read_csv(out / "credits_by_composer.csv").empty
    assert len(tracks_in(page)) == 2  # the tracks are still listed, with no share


def test_a_training_item_query_plays_its_own_track(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    key = json.loads((run["scores"] / "run.json").read_text())
    key["unlearned"].update(query=None, query_item="audio/track003.wav", query_id="audio/track003.wav")
    (run["scores"] / "run.json").write_text(json.dumps(key))
    out = tmp_path / "report"
    run_report(str(out), scores=str(run["scores"]), top_k=1, similarity="none")
    page = (out / "index.html").read_text()
    assert "caption 3" in page.split('id="top"')[0] and "training item audio/track003.wav" in page
    import soundfile as sf

    assert sf.info(str(out / "audio" / "query.wav")).frames == sf.info(str(run["folder"] / "audio/track003.wav")).frames

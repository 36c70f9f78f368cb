"""The report in a real browser: headless Chromium loads every audio player and shows the top-k rows.

Chromium comes from PATH (or MUSICATTR_CHROMIUM); when missing it is installed with apt (Debian's
``chromium``) if this runs as root, else the test is skipped with the reason. The screenshot is kept
at runs/test-artifacts/report.png (CI keeps it as an artifact).
"""
import re
import shutil

import pytest

from report_fixtures import ARTIFACTS, chromium, chromium_or_skip, copy_run, tiny_run  # noqa: F401  (fixture)

from musicattr.report.stage import run_report


def audio_counts(dom: str) -> dict[str, int]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "no <body> in the dumped DOM"
    return {k: int(v) for k, v in re.findall(r'data-audio-([a-z]+)="(\d+)"', body.group(1))}


@pytest.fixture
def browser() -> str:
    return chromium_or_skip()


@pytest.mark.slow
def test_report_page_plays_in_headless_chromium(browser, tiny_run, tmp_path):  # browser first: skip before the run
    run = copy_run(tiny_run, tmp_path / "run")  # similarity "compute" caches the training embeddings in the store
    out = tmp_path / "report"
    run_report(str(out), scores=str(run["scores"]), top_k=5, group_by=["composer"], similarity="compute")
    dom = chromium(browser, out / "index.html", "--dump-dom")
    assert audio_counts(dom) == {"total": 6, "loaded": 6, "failed": 0}  # the query and the 5 tracks
    assert len(re.findall(r'<tr class="track">', dom)) == 5
    assert "a low tone" in dom and "These shares are a model's estimate" in dom and "Noise floor" in dom
    assert "<th>Rank by all-against-all[aisfx]</th>" in dom and "By composer" in dom
    assert 'id="provenance"' in dom and "fingerprint" in dom
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    chromium(browser, out / "index.html", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.stat().st_size > 20_000

    broken = tmp_path / "broken"  # the same page with one undecodable audio file: the check must see it
    shutil.copytree(out, broken)
    (broken / "audio" / "track-01.wav").write_bytes(b"not audio at all")
    dom = chromium(browser, broken / "index.html", "--dump-dom")
    assert audio_counts(dom) == {"total": 6, "loaded": 5, "failed": 1}
    assert "this audio could not be played" in dom

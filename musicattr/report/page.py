"""HTML of the report pages: pure functions from plain records to one self-contained page.

Every value that comes from data (captions, prompts, file names, metadata, paths) goes through
:func:`esc` (``html.escape``); links point only at files the report wrote under names it chose.
A small inline script counts the audio players whose metadata loaded (``<body data-audio-loaded>``)
and marks the ones that fail to play.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 1.5em;
color:#1d1d1f;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.prompt{font-size:1.1em;background:#f4f4f8;padding:.6em .8em;border-left:4px solid #5856d6}
table{border-collapse:collapse;width:100%;font-size:.9em}th,td{border-bottom:1px solid #e4e4e4;padding:.35em .5em;
text-align:left;vertical-align:top}th{background:#fafafa}td.num{text-align:right;font-variant-numeric:tabular-nums}
audio{width:260px;height:32px}img{max-width:100%}.spec{max-width:260px;display:block}
.missing,.audio-error{color:#b00020;font-weight:600}.note{color:#555;font-size:.9em}
.estimate{background:#fff8e1;border:1px solid #f0c36d;padding:.6em .8em}
.caption{max-width:28em}.meta{font-size:.85em;color:#444}dl.prov{display:grid;grid-template-columns:max-content auto;
gap:.2em 1em;font-size:.9em}dl.prov dt{font-weight:600}dl.prov dd{margin:0;word-break:break-all}
.methods td{min-width:12em}.methods ol{margin:0;padding-left:1.4em}
"""

SCRIPT = """
(function () {
  var players = document.querySelectorAll('audio'), loaded = 0, failed = 0, b = document.body;
  function mark() { b.dataset.audioTotal = players.length; b.dataset.audioLoaded = loaded; b.dataset.audioFailed = failed; }
  function fail(a) {
    failed++;
    var n = document.createElement('div'); n.className = 'audio-error'; n.textContent = 'this audio could not be played';
    a.after(n); mark();
  }
  players.forEach(function (a) {
    if (a.error) { fail(a); }
    else if (a.readyState >= 1) { loaded++; }
    else {
      a.addEventListener('loadedmetadata', function () { loaded++; mark(); }, {once: true});
      a.addEventListener('error', function () { fail(a); }, {once: true});
    }
  });
  mark();
})();
"""


def esc(value: Any) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_score(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3e}"


def fmt_share(x: float) -> str:
    return f"{100 * x:.1f}%" if x > 0 else "—"


def audio_html(href: str | None, note: str = "") -> str:
    if href is None:
        return f'<div class="missing">{esc(note or "audio missing")}</div>'
    return f'<audio controls preload="metadata" src="{esc(href)}"></audio>'


def page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", row_cls: str = "") -> str:
    """A table whose cells are already HTML (escape them before)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(f'<tr class="{row_cls}">' + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def td(text: Any, num: bool = False, raw: bool = False) -> str:
    return f'<td class="num">{text if raw else esc(text)}</td>' if num else f"<td>{text if raw else esc(text)}</td>"


def provenance_html(items: Sequence[tuple[str, Any]]) -> str:
    return '<dl class="prov">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


@dataclass
class Track:
    """One top-k training track as the page shows it."""
    rank: int
    item_id: str
    caption: str
    file_name: str
    score: float
    share: float
    relative_rank: int | None = None
    similarity_ranks: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    audio: str | None = None
    audio_note: str = ""
    spectrogram: str | None = None


@dataclass
class CreditTable:
    column: str
    csv: str
    rows: list[tuple[str, float, int]]  # (value, share, tracks)


@dataclass
class QueryPage:
    query_id: str
    prompt: str | None
    audio: str | None
    audio_note: str
    spectrogram: str | None
    tracks: list[Track]
    n_items: int
    scores_plot: str
    rule: str
    credited: int
    top_k_share: float
    noise_floor: float | None
    top_score: float
    credit_tables: list[CreditTable]
    similarity_labels: list[str]
    similarity_note: str
    relative: bool
    provenance: list[tuple[str, Any]]
    back: str | None = None


def _tracks_table(p: QueryPage) -> str:
    sims = p.similarity_labels
    header = ["Rank", "Listen", "Caption and metadata", "Eq. 1 score τ", "Share", "Relative rank",
              *(f"Rank by {esc(s)}" for s in sims)]
    rows = []
    for t in p.tracks:
        listen = audio_html(t.audio, t.audio_note)
        if t.spectrogram:
            listen += f'<img class="spec" alt="spectrogram" src="{esc(t.spectrogram)}">'
        meta = "".join(f"<div><b>{esc(k)}</b>: {esc(v)}</div>" for k, v in t.metadata.items())
        text = (f'<div class="caption">{esc(t.caption)}</div><div class="meta"><div><b>file</b>: '
                f"{esc(t.file_name)}</div>{meta}</div>")
        rows.append([td(t.rank, num=True), td(listen, raw=True), td(text, raw=True), td(fmt_score(t.score), num=True),
                     td(fmt_share(t.share), num=True), td("—" if t.relative_rank is None else t.relative_rank, num=True),
                     *(td(t.similarity_ranks.get(s, "—"), num=True) for s in sims)])
    return table_html(header, rows, cls="tracks", row_cls="track")


def _credits_html(p: QueryPage) -> str:
    floor = ("unknown (no noise.json beside the scores)" if p.noise_floor is None
             else f"{p.noise_floor:.2e} (float error of the two losses); top score τ = {p.top_score:.2e}"
                  + (f", {p.top_score / p.noise_floor:.3g}× the floor" if p.noise_floor > 0 else ""))
    out = [f'<div class="estimate"><b>These shares are a model\'s estimate</b>, not a measurement of who made the '
           f"music: they follow from the unlearning scores of one model, one query and one set of random draws, and "
           f"move with them. Rule: {esc(p.rule)}. Credited: the {p.credited} tracks whose Eq. 1 score is above the "
           f"noise floor. <br><b>Noise floor</b>: {esc(floor)}.</div>"]
    if not p.credited:
        out.append('<p class="missing">No track is positively attributed above the noise floor: no credit to '
                   "share.</p>")
        return "\n".join(out)
    out.append(f'<p>The top {len(p.tracks)} tracks hold {100 * p.top_k_share:.1f}% of the credit; every credited '
               'track is in <a href="credits.csv">credits.csv</a>.</p>')
    for c in p.credit_tables:
        rows = [[td(v), td(fmt_share(s), num=True), td(n, num=True)] for v, s, n in c.rows]
        out.append(f'<h3>By {esc(c.column)} (<a href="{esc(c.csv)}">{esc(c.csv)}</a>)</h3>'
                   + table_html([esc(c.column), "Share", "Tracks"], rows, cls="credits"))
    return "\n".join(out)


def render_query(p: QueryPage) -> str:
    """The page of one query: prompt and audio, top-k tracks, credits, score plot, provenance."""
    back = f'<p><a href="{esc(p.back)}">← all queries</a></p>' if p.back else ""
    spec = f'<img alt="spectrogram of the query" src="{esc(p.spectrogram)}">' if p.spectrogram else ""
    rel = "" if p.relative else ('<p class="note">No relative scores (run `musicattr attribute` with '
                                 "--model.relative true for them).</p>")
    body = f"""{back}<h1>Attribution report: query {esc(p.query_id)}</h1>
<section id="query"><h2>The query</h2>
<div class="prompt">{esc(p.prompt) if p.prompt else '<span class="missing">prompt unknown</span>'}</div>
<p>{audio_html(p.audio, p.audio_note)}</p>{spec}</section>
<section id="top"><h2>Top {len(p.tracks)} of {p.n_items} training tracks</h2>
<p class="note">Ranked by the Eq. 1 score τ = L(z, θ unlearned) − L(z, θ0): how much a track's loss rises when the
query is unlearned. Relative rank: by τ / s (RelatIF). Similarity baselines: {esc(p.similarity_note)}.</p>{rel}
{_tracks_table(p)}</section>
<section id="credits"><h2>Credit shares</h2>
{_credits_html(p)}</section>
<section id="distribution"><h2>Score distribution</h2>
<p class="note">All training tracks sorted by their Eq. 1 score, the similarity scores read for the same tracks,
normalised as in Figure 1 of the paper (min-max, and softmax of the standardised scores).</p>
<img alt="score distribution" src="{esc(p.scores_plot)}"></section>
<section id="provenance"><h2>Provenance</h2>{provenance_html(p.provenance)}</section>"""
    return page(f"musicattr report: {p.query_id}", body)


@dataclass
class IndexRow:
    query_id: str
    prompt: str | None
    audio: str | None
    audio_note: str
    page: str
    methods: dict[str, list[tuple[int, str]]]  # method -> [(rank, caption)]
    stats: dict[str, str]


def render_index(title: str, rows: list[IndexRow], methods: list[str], stats: list[str], figure: str | None,
                 summary: list[tuple[str, Any]]) -> str:
    """The index over the queries of a compare run: each query's top tracks by each method side by side."""
    header = ["Query", *(esc(m) for m in methods), *(esc(s) for s in stats)]
    table_rows = []
    for r in rows:
        q = (f'<a href="{esc(r.page)}"><b>{esc(r.query_id)}</b></a> {esc(r.prompt or "(prompt unknown)")}'
             f"{audio_html(r.audio, r.audio_note)}")
        cells = [td(q, raw=True)]
        for m in methods:
            top = r.methods.get(m, [])
            cells.append(td("<ol>" + "".join(f'<li value="{k}">{esc(c)}</li>' for k, c in top) + "</ol>"
                            if top else "—", raw=True))
        cells += [td(r.stats.get(s, "—"), num=True) for s in stats]
        table_rows.append(cells)
    fig = f'<h2>Figure 1</h2><img alt="Figure 1" src="{esc(figure)}">' if figure else ""
    body = (f"<h1>{esc(title)}</h1><section id=\"summary\"><h2>Summary</h2>{provenance_html(summary)}</section>"
            f'<section id="queries"><h2>Queries, top tracks by method</h2>'
            f'{table_html(header, table_rows, cls="methods", row_cls="query")}</section>{fig}')
    return page(title, body)

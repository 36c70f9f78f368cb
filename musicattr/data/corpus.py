"""Embedded music corpus: render music21 corpus scores to captioned audio.

Pieces are drawn (deterministically given a seed) from a mix of sources shipped
with ``music21`` -- Bach chorales, Palestrina / Monteverdi, fiddle-tune abc books
(O'Neill, Ryan, Aird) and Essen folk songs -- given a General-MIDI instrument, a
tempo and a target duration, rendered through a soundfont and written as a
Hugging Face AudioFolder (``audio/*.wav`` + ``metadata.jsonl``).

The music21 corpus is licensed for non-commercial use only (the Essen collection
explicitly so); every metadata row carries a ``licence`` note.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musicattr.atomic import atomic_path

log = logging.getLogger(__name__)

LICENCE = ("music21 corpus: non-commercial research/education use only "
           "(see music21/corpus/license.txt)")
ESSEN_LICENCE = "Essen Folksong Collection via music21: non-commercial use only"

SOURCES = ("bach", "renaissance", "fiddle", "essen")
# Collections the demo never renders: a held-back corpus for measuring what was tuned on the demo (issue 21)
HELD_BACK_SOURCES = ("trecento", "classical", "fife")
ALL_SOURCES = SOURCES + HELD_BACK_SOURCES

# name -> (General-MIDI program, caption phrase)
INSTRUMENTS = {
    "piano": (0, "piano"), "harpsichord": (6, "harpsichord"), "marimba": (12, "marimba"),
    "organ": (19, "church organ"), "accordion": (21, "accordion"),
    "guitar": (24, "nylon-string guitar"), "violin": (40, "violin"), "cello": (42, "cello"),
    "harp": (46, "harp"), "strings": (48, "string ensemble"), "choir": (52, "choir"),
    "brass": (61, "brass section"), "oboe": (68, "oboe"), "clarinet": (71, "clarinet"),
    "flute": (73, "flute"), "recorder": (74, "recorder"),
}
# per source: (BPM range in quarter notes, caption kind, source's favourite instruments)
_SOURCE_STYLE = {
    "bach": ((56, 100), "Chorale", ["organ", "strings", "choir", "brass", "piano"]),
    "renaissance": ((70, 130), "Motet", ["choir", "strings", "organ", "recorder", "brass"]),
    "fiddle": ((88, 160), "Fiddle tune", ["violin", "flute", "accordion", "guitar", "piano"]),
    "essen": ((66, 140), "Folk song", ["flute", "guitar", "clarinet", "piano", "harp"]),
    "trecento": ((60, 110), "Ballata", ["recorder", "choir", "harp", "organ", "strings"]),
    "classical": ((72, 150), "String quartet movement", ["strings", "piano", "violin", "cello", "harpsichord"]),
    "fife": ((84, 150), "Fife tune", ["flute", "recorder", "violin", "accordion", "clarinet"]),
}
_CLASSICAL = {"haydn": "J. Haydn", "mozart": "W.A. Mozart"}  # one file per movement (Beethoven's parse too slowly)
_COLLECTIONS = {"oneills1850": "O'Neill's Music of Ireland", "ryansMammoth": "Ryan's Mammoth Collection",
                "airdsAirs": "Aird's Selection of Airs", "essenFolksong": "Essen folk song collection",
                "miscFolk/americanfifeopus.abc": "American fife tunes",
                "miscFolk/northumbrianminstrelsyopus.abc": "Northumbrian Minstrelsy"}
_NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight",
                 "nine", "ten"]
_RELEASE_S = 1.0


@dataclass
class Piece:
    """One candidate score of the corpus (an abc tune is a file plus an X: number)."""

    source: str  # one of SOURCES
    path: str  # music21 corpus path relative to the corpus root
    number: int | None = None  # abc reference number (X:) inside a multi-tune file
    fields: dict = field(default_factory=dict)  # abc header fields (T, R, O)

    @property
    def piece_id(self) -> str:
        return self.path if self.number is None else f"{self.path}#{self.number}"

    @property
    def slug(self) -> str:
        coll, stem = self.path.split("/")[0], Path(self.path).stem
        if self.source == "classical":  # haydn/opus74no1/movement2.mxl: one folder per work
            stem = f"{self.path.split('/')[1]}_{stem}"
        coll = {"oneills1850": "oneills", "ryansMammoth": "ryans", "airdsAirs": "aird",
                "essenFolksong": "essen", "miscFolk": "fife"}.get(coll, coll)
        s = f"{coll}_{stem}" if coll != "ryans" else f"{coll}_{stem[:40]}"
        if self.number is not None:
            s += f"_x{self.number}"
        return re.sub(r"[^a-z0-9_-]+", "-", s.lower()).strip("-")


# --------------------------------------------------------------------------- catalogue
def corpus_root() -> Path:
    """Directory of the music21 corpus."""
    from music21 import corpus
    return Path(corpus.__file__).parent


def _abc_tunes(path: Path) -> list[tuple[int, dict]]:
    """(X number, header fields) of each tune in an abc file, by a cheap text scan."""
    tunes, seen = [], set()
    for block in re.split(r"(?m)^X:", path.read_text(encoding="latin-1"))[1:]:
        m = re.match(r"\s*(\d+)", block)
        if not m or int(m.group(1)) in seen:
            continue
        seen.add(int(m.group(1)))
        f = {}
        for k, v in re.findall(r"(?m)^([TRO]):\s*(.*\S)", block):
            f.setdefault(k, v.strip())
        tunes.append((int(m.group(1)), f))
    return tunes


def list_pieces(source: str) -> list[Piece]:
    """All candidate pieces of one source, in a stable order."""
    root = corpus_root()
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    if source == "bach":
        return [Piece("bach", rel(p)) for p in sorted((root / "bach").glob("bwv*.mxl"))]
    if source == "renaissance":
        files = sorted((root / "palestrina").glob("*.krn")) + sorted(
            (root / "monteverdi").glob("*.mxl"))
        return [Piece("renaissance", rel(p)) for p in files]
    if source == "trecento":
        return [Piece("trecento", rel(p)) for p in sorted((root / "trecento").glob("*.xml"))]
    if source == "classical":
        return [Piece("classical", rel(p)) for d in _CLASSICAL for p in sorted((root / d).glob("*/movement*.mxl"))]
    dirs = {"fiddle": ["oneills1850", "ryansMammoth", "airdsAirs"], "essen": ["essenFolksong"]}
    if source == "fife":
        files = [root / f for f in _COLLECTIONS if f.startswith("miscFolk/")]
    elif source in dirs:
        files = [p for d in dirs[source] for p in sorted((root / d).glob("*.abc"))]
    else:
        raise ValueError(f"unknown corpus source {source!r}; choose from {ALL_SOURCES}")
    return [Piece(source, rel(p), n, f) for p in files for n, f in _abc_tunes(p)]


def candidate_order(sources: list[str], seed: int):
    """Yield pieces in a seed-determined order, mixing sources evenly."""
    rng = random.Random(f"corpus-order|{seed}")
    pools = {}
    for s in sources:
        pool = list_pieces(s)
        rng.shuffle(pool)
        pools[s] = pool
    while any(pools.values()):
        s = rng.choice([s for s in sources if pools[s]])
        yield pools[s].pop()


# --------------------------------------------------------------------------- choices
@dataclass
class Plan:
    """Per-piece random choices (depend only on seed and piece)."""

    instrument: str
    bpm: int
    target_s: float


def plan_piece(piece: Piece, seed: int, min_s: float, max_s: float) -> Plan:
    """Draw instrument, tempo and a log-uniform target duration for a piece."""
    rng = random.Random(f"{seed}|{piece.piece_id}")
    (lo, hi), _, fav = _SOURCE_STYLE[piece.source]
    inst = rng.choice(fav) if rng.random() < 0.6 else rng.choice(sorted(INSTRUMENTS))
    bpm = rng.randint(lo, hi)
    target = math.exp(rng.uniform(math.log(min_s), math.log(max(max_s, min_s))))
    return Plan(inst, bpm, round(target, 3))


def tempo_word(bpm: float) -> str:
    """A word for the tempo."""
    return "slow" if bpm < 76 else "moderate" if bpm < 112 else "fast"


# --------------------------------------------------------------------------- metadata
def _key_text(score) -> str:
    k = score.analyze("key")
    tonic = k.tonic.name.replace("-", "-flat").replace("#", "-sharp")
    return f"{tonic} {k.mode}"


def _meter_text(score) -> str:
    ts = score.recurse().getElementsByClass("TimeSignature").first()
    return ts.ratioString if ts is not None else "free meter"


def describe(piece: Piece, score) -> dict:
    """Title, composer, kind, key, metre and voice count of a parsed score."""
    from music21 import corpus
    md, f = score.metadata, piece.fields
    stem = Path(piece.path).stem
    kind = _SOURCE_STYLE[piece.source][1]
    composer, collection = None, None
    title = f.get("T") or (md.title if md is not None else None)
    if piece.source == "bach":
        bwv = stem[3:]
        info = corpus.chorales.ChoraleListRKBWV().byBWV
        hit = info.get(bwv) or info.get(bwv.split("-")[0])
        composer, title = "J.S. Bach", hit["title"] if hit else f"BWV {bwv}"
    elif piece.path.startswith("palestrina"):
        composer, kind = "G.P. da Palestrina", "Mass movement"
        head = dict(re.findall(r"(?m)^!!!(OTL|OPR):\s*(.*\S)",
                               (corpus_root() / piece.path).read_text(encoding="latin-1")))
        title = head.get("OTL", stem.split("_")[0])
        title += f" from {head['OPR']}" if head.get("OPR") else ""
    elif piece.path.startswith("monteverdi"):
        composer, kind = "C. Monteverdi", "Madrigal"
        title = (md.movementName if md is not None and md.movementName else stem)
        title = re.sub(r"^\d+\.\s*", "", title).title()
    elif piece.source == "trecento":
        composer = md.composer if md is not None and md.composer else None
        composer = re.sub(r"\s*\(.*|\s+[A-Z]{1,2}-[A-Za-z]+\s*\d.*$", "", (composer or "").split("\n")[0])
        composer = composer.strip() or "Anonymous"  # without its dates or manuscript siglum
        collection = "Polyphonic Music of the Fourteenth Century"
        title = re.sub(r"^(PMFC[\s\d]+(-|[A-Za-z]+[-\s]\d+[a-z]?[-\s]+)|[\d\s()]+\.\s*)|\s*-\s*(madrigal|ballata)\s*$",
                       "", (title or stem).replace("_", " "), flags=re.I)
        if re.match(r"(kyrie|gloria|credo|sanctus|agnus)", title, flags=re.I):
            kind = "Trecento mass movement"
        elif "madrigal" in (f.get("T") or (md.title if md is not None else "") or "").lower():
            kind = "Trecento madrigal"
    elif piece.source == "classical":
        composer = _CLASSICAL[piece.path.split("/")[0]]
        work = piece.path.split("/")[1]  # opus74no1, k458
        work = re.sub(r"opus(\d+)no(\d+)", r"Op. \1 No. \2", work).replace("k", "K. ")
        title = f"{work}, movement {re.sub(r'[^0-9]', '', stem)}"
        kind = "Piano sonata movement" if work == "K. 545" else kind
    else:
        collection = _COLLECTIONS.get(piece.path) or _COLLECTIONS[piece.path.split("/")[0]]
        if piece.source == "fiddle" and f.get("R"):
            kind = f["R"].split(",")[0].strip().capitalize()
        if piece.source == "essen" and f.get("O"):
            collection += f", {f['O'].split(',')[-1].strip()}"
    title = re.sub(r"\s+", " ", (title or stem).split(" -- ")[0].replace("'", "’"))
    title = title.strip(' ".')
    title = title.title() if title.isupper() else title
    voices = sum(1 for p in score.parts if p.recurse().notes) or 1
    return {"title": title, "composer": composer or "traditional", "kind": kind,
            "collection": collection, "key": _key_text(score), "meter": _meter_text(score),
            "voices": voices}


def make_caption(meta: dict) -> str:
    """Natural-language caption from the metadata fields."""
    who = (f"by {meta['composer']}" if meta["composer"] != "traditional"
           else f"(traditional, {meta['collection']})")
    v = meta["voices"]
    voices = "solo melody" if v == 1 else f"{_NUMBER_WORDS[v] if v < 11 else v} voices"
    return (f"{meta['kind']} '{meta['title']}' {who} in {meta['key']}, {meta['meter']}, "
            f"{meta['tempo']} tempo ({meta['bpm']} BPM), played on "
            f"{INSTRUMENTS[meta['instrument']][1]}, {voices}")


# --------------------------------------------------------------------------- rendering
def default_soundfont(renderer: str) -> str:
    """Soundfont path: TimGM6mb (pretty_midi) for tinysoundfont, FluidR3_GM for fluidsynth."""
    if renderer == "tinysoundfont":
        import pretty_midi
        return str(Path(pretty_midi.__file__).parent / "TimGM6mb.sf2")
    for p in ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/soundfonts/FluidR3_GM.sf2"):
        if Path(p).exists():
            return p
    raise FileNotFoundError("FluidR3_GM.sf2 not found: `apt-get install fluid-soundfont-gm` "
                            "or pass soundfont=<path.sf2>")


def score_to_midi(score, bpm: int, program: int, max_s: float):
    """Notes of every part (ties merged, repeats not expanded) as a pretty_midi object."""
    import pretty_midi
    from music21 import harmony
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    sec = 60.0 / bpm
    for part in score.stripTies().parts:
        inst = pretty_midi.Instrument(program=program)
        for n in part.flatten().notes:
            if isinstance(n, harmony.Harmony) or n.duration.quarterLength <= 0:
                continue
            start, end = float(n.offset) * sec, float(n.offset + n.duration.quarterLength) * sec
            if start >= max_s:
                continue
            vel = int(n.volume.velocity or 84)
            for p in n.pitches:
                inst.notes.append(pretty_midi.Note(vel, int(p.midi), start, end))
        if inst.notes:
            pm.instruments.append(inst)
    if not pm.instruments:
        raise ValueError("score has no notes")
    return pm


def synth_tinysoundfont(pm, sample_rate: int, n_samples: int, soundfont: str) -> np.ndarray:
    """Render a pretty_midi object with tinysoundfont -> float32 [n_samples, 2]."""
    import io
    import tinysoundfont
    buf = io.BytesIO()
    pm.write(buf)
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(soundfont)
    for ch in range(16):
        if ch != 9:
            synth.program_select(ch, sfid, 0, 0)
    seq = tinysoundfont.Sequencer(synth)
    seq.add(tinysoundfont.midi.load_memory(buf.getvalue()))
    return np.frombuffer(synth.generate(n_samples), dtype=np.float32).reshape(-1, 2).copy()


def synth_fluidsynth(pm, sample_rate: int, n_samples: int, soundfont: str) -> np.ndarray:
    """Render with the `fluidsynth` command-line program -> float32 [n_samples, C]."""
    import soundfile as sf
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise RuntimeError("renderer='fluidsynth' needs the fluidsynth binary "
                           "(`apt-get install fluidsynth fluid-soundfont-gm`)")
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
        pm.write(mid)
        subprocess.run([exe, "-ni", "-q", "-g", "0.6", "-r", str(sample_rate), "-F", wav,
                        soundfont, mid], check=True, capture_output=True)
        audio, _ = sf.read(wav, dtype="float32", always_2d=True)
    out = np.zeros((n_samples, audio.shape[1]), np.float32)
    out[: min(n_samples, len(audio))] = audio[:n_samples]
    return out


def render_piece(piece: Piece, plan: Plan, sample_rate: int, channels: int,
                 renderer: str, soundfont: str) -> tuple[np.ndarray, dict]:
    """Parse, describe and render one piece -> (audio [T, channels], metadata)."""
    from music21 import converter, stream
    warnings.filterwarnings("ignore")
    score = converter.parse(corpus_root() / piece.path, number=piece.number, forceSource=True)
    if isinstance(score, stream.Opus):
        score = score.scores[0]
    if not isinstance(score, stream.Score):
        score = stream.Score([score])
    meta = describe(piece, score)
    pm = score_to_midi(score, plan.bpm, INSTRUMENTS[plan.instrument][0], plan.target_s)
    length_s = min(plan.target_s, pm.get_end_time() + _RELEASE_S)
    n = max(1, int(round(length_s * sample_rate)))
    synth = synth_tinysoundfont if renderer == "tinysoundfont" else synth_fluidsynth
    audio = synth(pm, sample_rate, n, soundfont)
    audio = audio.mean(1, keepdims=True) if channels == 1 else audio[:, [0, -1]]
    peak = float(np.abs(audio).max())
    if not np.isfinite(peak) or peak < 1e-4:
        raise ValueError(f"silent render (peak {peak:.2g})")
    audio = (audio * (0.9 / peak)).astype(np.float32)
    meta.update(bpm=plan.bpm, tempo=tempo_word(plan.bpm), instrument=plan.instrument,
                gm_program=INSTRUMENTS[plan.instrument][0], duration_s=round(n / sample_rate, 4))
    return audio, meta


# --------------------------------------------------------------------------- workers
def _job(conn, piece, plan, wav_path, opts):
    """Worker-process body: render, write the wav atomically, send back the metadata."""
    try:
        import soundfile as sf
        audio, meta = render_piece(piece, plan, **opts)
        with atomic_path(wav_path) as tmp:  # <wav>.<pid>-<id>.tmp.wav, removed by the parent if killed
            sf.write(tmp, audio, opts["sample_rate"], subtype="PCM_16")
        conn.send(("ok", meta))
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        conn.send(("error", f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        conn.close()


def run_killable(jobs: list[tuple], workers: int, timeout_s: float):
    """Run ``_job`` for each (key, piece, plan, wav, opts) in worker processes.

    At most ``workers`` at a time; a job running longer than ``timeout_s`` is killed.
    Yields (key, status, payload) as jobs finish, status in {"ok", "error", "timeout"}.
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < max(1, workers):
            key, *args = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_job, args=(send, *args), daemon=True)
            proc.start()
            send.close()
            running[key] = (proc, recv, time.monotonic(), args[2])
        next_deadline = min(r[2] for r in running.values()) + timeout_s
        ready = mp.connection.wait([r[1] for r in running.values()],
                                   timeout=min(0.2, max(0.0, next_deadline - time.monotonic())))
        for key, (proc, recv, t0, wav) in list(running.items()):
            if recv in ready:
                try:
                    status, payload = recv.recv()
                except EOFError:
                    status, payload = "error", f"worker died (exit code {proc.exitcode})"
            elif time.monotonic() - t0 > timeout_s:
                proc.kill()
                status, payload = "timeout", f"timed out after {timeout_s:g} s"
            else:
                continue
            proc.join()
            recv.close()
            for tmp in Path(wav).parent.glob(Path(wav).name + ".*.tmp.wav"):
                tmp.unlink(missing_ok=True)
            del running[key]
            yield key, status, payload


# --------------------------------------------------------------------------- main entry
def _write_json(path: Path, obj, jsonl: bool = False) -> None:
    """Write JSON (or JSON lines for a list) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in obj)
        else:
            json.dump(obj, f, ensure_ascii=False, indent=2)


def _dedupe_captions(rows: list[dict]) -> None:
    """Make captions distinct by appending a take number to repeats."""
    seen: dict[str, int] = {}
    for r in rows:
        c = r["caption"]
        seen[c] = seen.get(c, 0) + 1
        if seen[c] > 1:
            r["caption"] = f"{c}, take {seen[c]}"


def _plant(out: Path, rows: list[dict], n_planted: int, copies: int, seed: int) -> list:
    """Duplicate n_planted tracks `copies` times; return planted groups and new rows.

    The planted tracks are drawn in turn from each source (Bach, Renaissance, fiddle tunes, Essen), so the
    memorisation ground truth covers the corpus' styles rather than whichever source a draw favours."""
    rng = random.Random(f"planted|{seed}")
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_source.setdefault(r.get("source_group", ""), []).append(i)
    pools = [rng.sample(by_source[src], len(by_source[src])) for src in sorted(by_source)]
    chosen = []
    while len(chosen) < min(n_planted, len(rows)):
        for pool in pools:
            if pool and len(chosen) < n_planted:
                chosen.append(pool.pop())
    chosen = sorted(chosen)
    groups, extra = [], []
    for k, i in enumerate(chosen):
        orig = rows[i]
        orig["planted_group"] = orig["file_name"]
        names = []
        for j in range(copies):
            name = f"audio/planted_{k}_copy{j}.wav"
            shutil.copyfile(out / orig["file_name"], out / name)
            extra.append({**orig, "file_name": name, "planted_copy": j})
            names.append(name)
        groups.append({"original": orig["file_name"], "copies": names,
                       "caption": orig["caption"]})
    return groups, extra


def render_corpus(out_dir: str, n_tracks: int = 320, seed: int = 0, sample_rate: int = 16000,
                  channels: int = 1, min_seconds: float = 2.0, max_seconds: float = 16.0,
                  piece_timeout_s: float = 30.0, workers: int = 2, n_planted: int = 0,
                  planted_copies: int = 8, renderer: str = "tinysoundfont",
                  sources: list[str] | None = None, soundfont: str | None = None) -> dict:
    """Render a captioned music corpus from the music21 corpus into an AudioFolder.

    Args:
        out_dir: output folder (gets ``audio/``, ``metadata.jsonl``, ``skipped.json``,
            ``planted.json`` and a ``.parts/`` resume cache).
        n_tracks: number of (original) tracks to render.
        seed: drives piece choice, instrument, tempo, duration and planted tracks.
        sample_rate: output sample rate (Hz).
        channels: 1 (mono) or 2 (stereo).
        min_seconds: shortest target duration; targets are log-uniform in
            [min_seconds, max_seconds]; pieces that end earlier stay shorter.
        max_seconds: longest target duration (audio is cropped to the target).
        piece_timeout_s: a piece whose worker runs longer is killed and skipped.
        workers: parallel worker processes (<=0: all CPUs).
        n_planted: number of tracks to duplicate as planted memorisation ground truth.
        planted_copies: extra copies written per planted track.
        renderer: "tinysoundfont" (TimGM6mb soundfont) or "fluidsynth" (binary + FluidR3_GM).
        sources: subset of ALL_SOURCES; default the demo's four (SOURCES). HELD_BACK_SOURCES ("trecento",
            "classical", "fife") are collections the demo never renders (`make heldback`).
        soundfont: optional .sf2 path overriding the renderer's default.

    Returns:
        Summary dict (counts, total audio seconds, elapsed time, paths).
    """
    t0 = time.time()
    if renderer not in ("tinysoundfont", "fluidsynth"):
        raise ValueError(f"renderer must be 'tinysoundfont' or 'fluidsynth', got {renderer!r}")
    if renderer == "fluidsynth" and shutil.which("fluidsynth") is None:
        raise RuntimeError("renderer='fluidsynth' needs the fluidsynth binary "
                           "(`apt-get install fluidsynth fluid-soundfont-gm`)")
    if channels not in (1, 2):
        raise ValueError("channels must be 1 or 2")
    sources = list(sources or SOURCES)
    for s in sources:
        if s not in ALL_SOURCES:
            raise ValueError(f"unknown corpus source {s!r}; choose from {ALL_SOURCES}")
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / ".parts").mkdir(exist_ok=True)
    opts = dict(sample_rate=sample_rate, channels=channels, renderer=renderer,
                soundfont=soundfont or default_soundfont(renderer))
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    params = dict(sample_rate=sample_rate, channels=channels, renderer=renderer)

    order = candidate_order(sources, seed)
    rows, skipped, reused, done, n_jobs_done = [], [], 0, False, 0
    every = max(1, n_tracks // 20)
    max_skips = 2 * n_tracks + 20  # give up if the renderer fails on (almost) everything
    while len(rows) < n_tracks and not done and len(skipped) <= max_skips:
        batch = []  # one round = as many candidates as tracks still missing
        for piece in order:
            batch.append(piece)
            if len(batch) >= n_tracks - len(rows):
                break
        else:
            done = True
        results, jobs = {}, []
        for i, piece in enumerate(batch):
            plan = plan_piece(piece, seed, min_seconds, max_seconds)
            name = f"{piece.slug}_{plan.instrument}"
            wav, part = out / "audio" / f"{name}.wav", out / ".parts" / f"{name}.json"
            want = {**params, "plan": plan.__dict__, "piece": piece.piece_id}
            cached = json.loads(part.read_text()) if part.exists() else None
            if cached and cached.get("want") == want and (
                    cached["status"] == "error" or wav.exists()):
                results[i] = (cached["status"], cached["payload"])
                reused += cached["status"] == "ok"
            else:
                jobs.append((i, piece, plan, str(wav), opts))
            batch[i] = (piece, name, part, want)
        for i, status, payload in run_killable(jobs, workers, piece_timeout_s):
            results[i] = (status, payload)
            piece, name, part, want = batch[i]
            if status != "timeout":  # timeouts depend on load: retry them on a rerun
                _write_json(part, {"want": want, "status": status, "payload": payload})
            n_jobs_done += 1
            if n_jobs_done % every == 0:
                log.info("[corpus] %d pieces rendered/tried, %.1f s", n_jobs_done, time.time() - t0)
        for i, (piece, name, part, want) in enumerate(batch):
            status, payload = results[i]
            if status != "ok":
                skipped.append({"source": piece.piece_id, "name": name, "status": status,
                                "reason": payload})
                continue
            meta = dict(payload)
            meta["caption"] = make_caption(meta)
            licence = ESSEN_LICENCE if piece.source == "essen" else LICENCE
            rows.append({"file_name": f"audio/{name}.wav", "caption": meta.pop("caption"),
                         **meta, "source": piece.piece_id, "source_group": piece.source,
                         "licence": licence})
        log.info("[corpus] %d/%d tracks, %d skipped, %.1f s", len(rows), n_tracks, len(skipped), time.time() - t0)

    if len(rows) < n_tracks:
        log.warning("[corpus] only %d/%d tracks rendered (%d skipped, see skipped.json)", len(rows), n_tracks,
                    len(skipped))
    _dedupe_captions(rows)
    groups, extra = _plant(out, rows, n_planted, planted_copies, seed) if n_planted > 0 \
        else ([], [])
    if groups:
        _write_json(out / "planted.json", {"groups": groups})
    _write_json(out / "skipped.json", skipped)
    _write_json(out / "metadata.jsonl", rows + extra, jsonl=True)
    durs = [r["duration_s"] for r in rows]
    return {"out_dir": str(out), "n_tracks": len(rows), "n_requested": n_tracks,
            "n_reused": reused, "n_skipped": len(skipped), "n_planted": len(groups),
            "n_files": len(rows) + len(extra), "total_seconds": round(sum(durs), 2),
            "share_under_third": round(np.mean([d < max_seconds / 3 for d in durs]), 3)
            if durs else 0.0,
            "by_source": {s: sum(r["source_group"] == s for r in rows) for s in sources},
            "elapsed_s": round(time.time() - t0, 2), "licence": LICENCE}

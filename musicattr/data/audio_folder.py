"""Bring-your-own audio: ingest a Hugging Face AudioFolder-style directory.

A folder holds audio files plus ``metadata.jsonl`` (or ``metadata.csv``) with at
least the columns ``file_name`` (relative to the folder) and ``caption``. Every row
is validated up front; bad rows are skipped with a message naming the file, the
problem and the fix (or, with ``strict=True``, all of them are raised at once).
A ``file_name`` that leaves the folder (absolute, or ``..`` after normalisation) is
refused unless ``allow_outside=True``; symlinks inside the folder are followed. Two
rows naming the same file (same device and inode) are duplicates.

Items are loaded like stable-audio-tools' ``PadCrop_Normalized_T`` with the crop at
offset 0: crop/zero-pad to ``max_samples``, ``seconds_start = 0`` and
``seconds_total = ceil(original_samples / sample_rate)``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from musicattr.atomic import atomic_write_json

log = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = ("wav", "flac", "ogg", "mp3")
SILENCE_PEAK = 1e-5
REQUIRED_COLUMNS = ("file_name", "caption")


class MetadataError(ValueError):
    """The metadata file is missing or malformed."""


@dataclass
class BadItem:
    """One row of the metadata that cannot be used."""

    file_name: str
    problem: str
    fix: str

    def message(self) -> str:
        return f"{self.file_name}: {self.problem}; fix: {self.fix}"


class BadAudioError(ValueError):
    """An audio file cannot be used; ``.item`` is the BadItem."""

    def __init__(self, item: BadItem):
        super().__init__(item.message())
        self.item = item


class BadInputError(ValueError):
    """strict mode: the folder has bad rows; ``.items`` lists them all."""

    def __init__(self, items: list[BadItem]):
        lines = "\n".join(f"  - {b.message()}" for b in items)
        super().__init__(f"{len(items)} bad item(s) in the audio folder:\n{lines}")
        self.items = items


# --------------------------------------------------------------------------- metadata
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetadataError(f"{path}: line {n} is not valid JSON ({e.msg}); fix: write "
                                    "one JSON object per line, e.g. "
                                    '{"file_name": "audio/a.wav", "caption": "..."}') from e
            if not isinstance(row, dict):
                raise MetadataError(f"{path}: line {n} is not a JSON object; fix: write one "
                                    "JSON object per line")
            rows.append(row)
    present = set().union(*rows) if rows else set()
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise MetadataError(f"{path}: required field(s) {missing} appear in no line; fix: "
                            "give every line the keys 'file_name' and 'caption'")
    return rows


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise MetadataError(f"{path}: required column(s) {missing} missing from the header "
                                f"{reader.fieldnames}; fix: add a header row with "
                                "'file_name,caption,...'")
        return [dict(r) for r in reader]


def metadata_path(folder: str | Path) -> Path:
    """``folder/metadata.jsonl`` (preferred) or ``folder/metadata.csv``, else MetadataError."""
    folder = Path(folder)
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return folder / name
    raise MetadataError(f"{folder}: no metadata.jsonl or metadata.csv found; fix: add "
                        "metadata.jsonl with one line per file, e.g. "
                        '{"file_name": "audio/a.wav", "caption": "solo piano, slow"}')


def read_metadata(folder: str | Path) -> list[dict]:
    """Rows of ``folder/metadata.jsonl`` (preferred) or ``folder/metadata.csv``."""
    path = metadata_path(folder)
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)


# --------------------------------------------------------------------------- audio checks
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: int | None = None


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


@contextmanager
def quiet_c_stderr():
    """Point file descriptor 2 at /dev/null inside the block, restoring it afterwards.

    Silences what C libraries print while decoding (mpg123's "Note: Illegal
    Audio-MPEG-Header ..." on corrupt mp3s); Python exceptions are unaffected.
    Nesting and concurrent threads are safe: the first entrant redirects, the last restores.
    """
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            _flush_stderr()
            try:
                saved = os.dup(2)
            except OSError:  # no fd 2: nothing to silence
                saved = None
            if saved is not None:
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, 2)
                except OSError:
                    os.close(saved)
                    raise
                finally:
                    os.close(devnull)
            _quiet_saved = saved
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                _flush_stderr()
                os.dup2(_quiet_saved, 2)
                os.close(_quiet_saved)
                _quiet_saved = None


def _bad(name, problem, fix) -> BadAudioError:
    return BadAudioError(BadItem(str(name), problem, fix))


def _check_path(path: Path, name: str) -> None:
    """Supported extension and existing file, else BadAudioError."""
    ext = path.suffix.lower().lstrip(".")
    if ext not in SUPPORTED_EXTENSIONS:
        raise _bad(name, f"unsupported extension '.{ext}' (supported: "
                   f"{', '.join(SUPPORTED_EXTENSIONS)})",
                   "convert it, e.g. `ffmpeg -i in.aiff out.wav`, and update file_name")
    if not path.is_file():
        raise _bad(name, f"file not found ({path})",
                   "check file_name is relative to the folder holding metadata, or remove the row")


def _unreadable(name: str, e: Exception) -> BadAudioError:
    return _bad(name, f"unreadable or corrupt audio file ({str(e).strip()[:120]})",
                "re-export or re-encode the file, or remove the row")


def _check_content(name: str, frames: int, finite: bool, peak: float) -> None:
    """Non-empty, finite and not silent, else BadAudioError."""
    if frames <= 0:
        raise _bad(name, "empty audio (0 samples)", "remove the row or replace the file")
    if not finite:
        raise _bad(name, "NaN or infinite samples",
                   "re-export the audio from its source (e.g. as 16-bit PCM), or remove the row")
    if peak < SILENCE_PEAK:
        raise _bad(name, f"all-silent audio (peak {peak:.3g} < {SILENCE_PEAK:g})",
                   "replace the file with the intended audio, or remove the row")


def check_audio_file(path: str | Path, name: str | None = None):
    """Validate one file (extension, exists, readable, non-empty, finite, not silent).

    Reads the file block-wise; returns its ``soundfile.info``. Raises BadAudioError.
    """
    path, name = Path(path), name or str(path)
    _check_path(path, name)
    try:
        with quiet_c_stderr():
            info = sf.info(str(path))
            peak, finite = 0.0, True
            for block in sf.blocks(str(path), blocksize=1 << 18, dtype="float32", always_2d=True):
                finite = finite and bool(np.isfinite(block).all())
                if finite and block.size:
                    peak = max(peak, float(np.abs(block).max()))
    except (RuntimeError, ValueError, sf.LibsndfileError) as e:
        raise _unreadable(name, e) from e
    _check_content(name, info.frames if info.samplerate > 0 else 0, finite, peak)
    return info


def convert_audio(audio: torch.Tensor, orig_sr: int, sample_rate: int,
                  channels: int) -> torch.Tensor:
    """[C, T] float -> [channels, T'] at sample_rate (average to mono, duplicate to stereo)."""
    if audio.shape[0] != channels:
        audio = audio.mean(0, keepdim=True)
        if channels > 1:
            audio = audio.expand(channels, -1).contiguous()
    if orig_sr != sample_rate:
        audio = torchaudio.functional.resample(audio, orig_sr, sample_rate)
    return audio


def read_audio(path: str | Path, sample_rate: int, channels: int,
               name: str | None = None) -> torch.Tensor:
    """Validated, channel-converted, resampled full audio [channels, T]."""
    path, name = Path(path), name or str(path)
    _check_path(path, name)
    try:
        with quiet_c_stderr():
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, sf.LibsndfileError) as e:
        raise _unreadable(name, e) from e
    finite = bool(np.isfinite(data).all())
    _check_content(name, data.shape[0], finite, float(np.abs(data).max()) if finite and
                   data.size else 0.0)
    return convert_audio(torch.from_numpy(data.T.copy()), sr, sample_rate, channels)


def pad_crop(audio: torch.Tensor, n_samples: int, offset: int = 0) -> tuple[torch.Tensor, int]:
    """Window [offset, offset+n_samples) of [C, T] audio, zero-padded -> (chunk, valid)."""
    chunk = audio.new_zeros(audio.shape[0], n_samples)
    piece = audio[:, offset: offset + n_samples]
    chunk[:, : piece.shape[1]] = piece
    return chunk, int(piece.shape[1])


def load_audio(path: str | Path, sample_rate: int, channels: int,
               max_samples: int) -> tuple[torch.Tensor, int]:
    """(audio [channels, max_samples] cropped from the start / zero-padded, valid_samples)."""
    return pad_crop(read_audio(path, sample_rate, channels), max_samples)


def padding_mask(valid_samples: int, max_samples: int) -> torch.Tensor:
    """Bool mask [max_samples]: True on real audio, False on zero padding."""
    return torch.arange(max_samples) < valid_samples


def seconds_total(num_samples: int, sample_rate: int) -> int:
    """stable-audio-tools timing: ceil(original length in seconds)."""
    return math.ceil(num_samples / sample_rate)


# --------------------------------------------------------------------------- folder scan
def _outside(name: str) -> bool:
    """Lexically leaves the folder: absolute, or starts with '..' once normalised."""
    norm = os.path.normpath(name)
    return os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep)


def _file_key(folder: Path, name: str):
    """Identity of the named file: (st_dev, st_ino) when it exists, else its normalised name."""
    try:
        st = os.stat(folder / name)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("name", Path(os.path.normpath(name)).as_posix())


def _row_problem(row: dict, i: int, seen: dict, folder: Path, meta: Path,
                 allow_outside: bool = False) -> BadItem | None:
    """Metadata-level checks of one row (value present, inside the folder, unique, caption)."""
    name = row.get("file_name")
    if not isinstance(name, str) or not name.strip():
        return BadItem(f"<metadata row {i + 1}>", "missing file_name value",
                       "fill in the path of the audio file relative to the folder")
    if not allow_outside and _outside(name.strip()):
        return BadItem(name, f"file_name outside the folder (row {i + 1} of {meta} points "
                       f"outside {folder})",
                       "move the file into the folder and give its path relative to the folder, or pass "
                       "allow_outside (`musicattr encode --model.allow_outside true`) to read it from where it is")
    key = _file_key(folder, name.strip())
    if key in seen:
        return BadItem(name, f"duplicate file_name (first listed on row {seen[key] + 1})",
                       "list each file once; keep one caption per file")
    seen[key] = i
    cap = row.get("caption")
    if not isinstance(cap, str) or not cap.strip():
        return BadItem(name, "empty caption", "write a text description of the audio")
    return None


def scan_audio_folder(folder: str | Path, sample_rate: int, channels: int, max_samples: int,
                      strict: bool = False,
                      allow_outside: bool = False) -> tuple[list[dict], list[BadItem]]:
    """Validate every row of an AudioFolder; return (good rows, bad items).

    Good rows keep all metadata columns and gain ``path`` (absolute), ``duration_s``,
    ``orig_sample_rate``, ``orig_channels``, ``num_samples`` (at ``sample_rate``),
    ``valid_samples`` and ``seconds_total``. Each bad item prints a warning line;
    ``strict=True`` raises BadInputError listing them all instead. ``allow_outside=True``
    accepts file_names that leave the folder (absolute or with ``..``).
    """
    folder = Path(folder).resolve()
    meta = metadata_path(folder)
    good, bad, seen = [], [], {}
    for i, row in enumerate(read_metadata(folder)):
        item = _row_problem(row, i, seen, folder, meta, allow_outside)
        if item is None:
            name = row["file_name"].strip()
            path = folder / name
            try:
                info = check_audio_file(path, name)
            except BadAudioError as e:
                item = e.item
        if item is not None:
            bad.append(item)
            continue
        n = math.ceil(info.frames * sample_rate / info.samplerate)
        good.append({**row, "file_name": name, "caption": row["caption"].strip(),
                     "path": str(path), "duration_s": info.frames / info.samplerate,
                     "orig_sample_rate": info.samplerate, "orig_channels": info.channels,
                     "num_samples": n, "valid_samples": min(n, max_samples),
                     "seconds_total": seconds_total(n, sample_rate)})
    if bad and strict:
        raise BadInputError(bad)
    for b in bad:
        log.warning("skipping %s: %s; fix: %s", b.file_name, b.problem, b.fix)
    return good, bad


def write_skip_report(path: str | Path, bad_items: list[BadItem]) -> dict:
    """Write (and return) a JSON summary of the skipped rows."""
    kinds = Counter(b.problem.split(" (")[0].split(":")[0] for b in bad_items)
    report = {"n_skipped": len(bad_items), "by_problem": dict(kinds),
              "items": [asdict(b) for b in bad_items]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    return report


# --------------------------------------------------------------------------- dataset
class AudioFolderDataset(torch.utils.data.Dataset):
    """Captioned audio items from validated rows (see ``scan_audio_folder``).

    Each item: ``audio`` [C, max_samples] (or [C, crop_samples]), ``valid_samples``,
    ``seconds_start``, ``seconds_total``, ``caption``, ``file_name``, ``item_id``
    (= file_name, stable) and ``index``. With ``crop_samples`` set, a random window
    of that length is taken (for autoencoder training); ``crop_seed`` makes the
    window of each index fixed, otherwise torch's global RNG is used.
    """

    def __init__(self, rows: list[dict], sample_rate: int, channels: int, max_samples: int,
                 crop_samples: int | None = None, crop_seed: int | None = None):
        self.rows, self.sample_rate, self.channels = list(rows), sample_rate, channels
        self.max_samples, self.crop_samples, self.crop_seed = max_samples, crop_samples, crop_seed

    @classmethod
    def from_folder(cls, folder: str | Path, sample_rate: int, channels: int, max_samples: int,
                    strict: bool = False, skip_report: str | Path | None = None,
                    allow_outside: bool = False, **kwargs):
        """Scan a folder (optionally writing a skip report) and build the dataset."""
        rows, bad = scan_audio_folder(folder, sample_rate, channels, max_samples, strict,
                                      allow_outside)
        if skip_report is not None:
            write_skip_report(skip_report, bad)
        return cls(rows, sample_rate, channels, max_samples, **kwargs)

    def __len__(self) -> int:
        return len(self.rows)

    def _offset(self, i: int, n: int) -> int:
        upper = max(0, n - self.crop_samples)
        gen = torch.Generator().manual_seed(self.crop_seed + i) if self.crop_seed is not None \
            else None
        return int(torch.randint(0, upper + 1, (1,), generator=gen))

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        audio = read_audio(row["path"], self.sample_rate, self.channels, row["file_name"])
        n = audio.shape[1]
        if self.crop_samples:
            offset = self._offset(i, n)
            chunk, valid = pad_crop(audio, self.crop_samples, offset)
        else:
            offset = 0
            chunk, valid = pad_crop(audio, self.max_samples)
        return {"audio": chunk, "valid_samples": valid,
                "seconds_start": math.floor(offset / self.sample_rate),
                "seconds_total": seconds_total(n, self.sample_rate),
                "caption": row["caption"], "file_name": row["file_name"],
                "item_id": row["file_name"], "index": i}

"""Tests of bring-your-own audio folder ingestion (musicattr.data.audio_folder)."""
import json
import os
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from musicattr.data import audio_folder as af

SR = 16000


def _tone(n, sr=SR, ch=1, f=440.0):
    t = np.arange(n) / sr
    x = 0.5 * np.sin(2 * np.pi * f * t).astype(np.float32)
    return np.stack([x] * ch, 1)


@pytest.fixture
def folder(tmp_path):
    """A folder with three good files and one row per kind of bad input."""
    a = tmp_path / "audio"
    a.mkdir()
    sf.write(a / "good.wav", _tone(SR), SR)
    sf.write(a / "good.flac", _tone(SR // 2, ch=2), SR)
    sf.write(a / "good.ogg", _tone(22050, sr=22050), 22050)
    (a / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage" * 20)
    (a / "notes.txt").write_text("not audio")
    sf.write(a / "clip.aiff", _tone(100), SR)
    sf.write(a / "empty.wav", np.zeros((0, 1), np.float32), SR)
    sf.write(a / "zeros.wav", np.zeros((SR, 1), np.float32), SR)
    nan = _tone(SR)
    nan[10] = np.nan
    sf.write(a / "nan.wav", nan, SR, subtype="FLOAT")
    inf = _tone(SR)
    inf[20] = np.inf
    sf.write(a / "inf.wav", inf, SR, subtype="FLOAT")
    rows = [
        {"file_name": "audio/good.wav", "caption": "a tone", "genre": "test"},
        {"file_name": "audio/good.flac", "caption": "stereo tone"},
        {"file_name": "audio/good.ogg", "caption": "ogg tone"},
        {"file_name": "audio/corrupt.wav", "caption": "x"},
        {"file_name": "audio/notes.txt", "caption": "x"},
        {"file_name": "audio/clip.aiff", "caption": "x"},
        {"file_name": "audio/empty.wav", "caption": "x"},
        {"file_name": "audio/zeros.wav", "caption": "x"},
        {"file_name": "audio/nan.wav", "caption": "x"},
        {"file_name": "audio/inf.wav", "caption": "x"},
        {"caption": "no file name"},
        {"file_name": "audio/good.wav", "caption": "duplicate"},
        {"file_name": "audio/missing.wav", "caption": "x"},
        {"file_name": "audio/good_copy.wav", "caption": "   "},
        {"file_name": "audio/good.mp3", "caption": "mp3 tone"},
    ]
    sf.write(a / "good.mp3", _tone(SR), SR)
    sf.write(a / "good_copy.wav", _tone(SR), SR)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


EXPECTED = {
    "audio/corrupt.wav": "unreadable or corrupt",
    "audio/notes.txt": "unsupported extension '.txt'",
    "audio/clip.aiff": "unsupported extension '.aiff'",
    "audio/empty.wav": "empty audio (0 samples)",
    "audio/zeros.wav": "all-silent audio",
    "audio/nan.wav": "NaN or infinite samples",
    "audio/inf.wav": "NaN or infinite samples",
    "<metadata row 11>": "missing file_name value",
    "audio/good.wav": "duplicate file_name (first listed on row 1)",
    "audio/missing.wav": "file not found",
    "audio/good_copy.wav": "empty caption",
}


def test_scan_reports_every_bad_input(folder, caplog):
    with caplog.at_level("WARNING", logger="musicattr"):
        good, bad = af.scan_audio_folder(folder, SR, 1, SR)
    assert [r["file_name"] for r in good] == ["audio/good.wav", "audio/good.flac",
                                                "audio/good.ogg", "audio/good.mp3"]
    assert {b.file_name: b.problem for b in bad}.keys() == EXPECTED.keys()
    assert len(bad) == len(EXPECTED)
    for b in bad:
        assert b.problem.startswith(EXPECTED[b.file_name]) and b.fix
    assert any("skipping audio/nan.wav: NaN or infinite samples; fix: " in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    g = good[0]
    assert g["genre"] == "test" and g["path"] == str(folder.resolve() / "audio/good.wav")
    assert g["duration_s"] == 1.0 and g["seconds_total"] == 1 and g["valid_samples"] == SR
    ogg = good[2]
    assert ogg["orig_sample_rate"] == 22050 and ogg["num_samples"] == SR


def test_strict_and_skip_report(folder, tmp_path):
    with pytest.raises(af.BadInputError) as e:
        af.scan_audio_folder(folder, SR, 1, SR, strict=True)
    assert len(e.value.items) == len(EXPECTED) and "audio/inf.wav" in str(e.value)
    _, bad = af.scan_audio_folder(folder, SR, 1, SR)
    rep = af.write_skip_report(tmp_path / "r/skipped.json", bad)
    on_disk = json.loads((tmp_path / "r/skipped.json").read_text())
    assert on_disk == rep and rep["n_skipped"] == len(EXPECTED)
    assert rep["by_problem"]["NaN or infinite samples"] == 2
    assert {"file_name", "problem", "fix"} == set(rep["items"][0])


def test_metadata_errors(tmp_path):
    with pytest.raises(af.MetadataError, match="no metadata.jsonl or metadata.csv"):
        af.read_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\na.wav,hello\n")
    with pytest.raises(af.MetadataError, match=r"metadata.csv.*\['caption'\]"):
        af.read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.wav", "caption": "x"}\n\n{oops\n')
    with pytest.raises(af.MetadataError, match="line 3 is not valid JSON"):
        af.read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.wav"}\n')
    with pytest.raises(af.MetadataError, match="caption"):
        af.read_metadata(tmp_path)


def test_metadata_csv_variant(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(SR), SR)
    sf.write(tmp_path / "b.flac", _tone(SR), SR)
    (tmp_path / "metadata.csv").write_text(
        'file_name,caption,bpm\na.wav,"piano, slow",60\nb.flac,,70\n')
    good, bad = af.scan_audio_folder(tmp_path, SR, 1, SR)
    assert [(r["file_name"], r["caption"], r["bpm"]) for r in good] == [("a.wav", "piano, slow",
                                                                           "60")]
    assert [(b.file_name, b.problem) for b in bad] == [("b.flac", "empty caption")]


def test_load_audio_convert_resample_crop_pad(tmp_path):
    sf.write(tmp_path / "st.wav", np.stack([np.full(SR, 0.2), np.full(SR, 0.6)], 1), SR)
    x, n = af.load_audio(tmp_path / "st.wav", SR, 1, 2 * SR)  # mono + pad
    assert x.shape == (1, 2 * SR) and x.dtype == torch.float32 and n == SR
    assert torch.allclose(x[:, :SR], torch.tensor(0.4), atol=1e-4) and x[:, SR:].abs().max() == 0
    x, n = af.load_audio(tmp_path / "st.wav", SR, 2, SR // 4)  # crop from the start
    assert x.shape == (2, SR // 4) and n == SR // 4
    assert torch.allclose(x[1], torch.tensor(0.6), atol=1e-4)
    sf.write(tmp_path / "m.flac", _tone(44100, sr=44100), 44100)
    x, n = af.load_audio(tmp_path / "m.flac", SR, 2, 3 * SR)  # resample + stereo + pad
    assert x.shape == (2, 3 * SR) and n == SR and torch.equal(x[0], x[1])
    spec = torch.fft.rfft(x[0, :SR]).abs()
    assert abs(int(spec.argmax()) - 440) <= 1
    with pytest.raises(af.BadAudioError) as e:
        af.load_audio(tmp_path / "nothere.wav", SR, 1, SR)
    assert e.value.item.problem.startswith("file not found")


def test_padding_mask_and_seconds_total():
    m = af.padding_mask(3, 5)
    assert m.dtype == torch.bool and m.tolist() == [True, True, True, False, False]
    assert af.padding_mask(9, 4).all()
    assert af.seconds_total(SR, SR) == 1 and af.seconds_total(SR + 1, SR) == 2


def test_dataset_items_and_random_crop(folder):
    ds = af.AudioFolderDataset.from_folder(folder, SR, 1, SR * 3 // 4,
                                           skip_report=folder / "skipped.json")
    assert len(ds) == 4 and (folder / "skipped.json").is_file()
    it = ds[1]
    assert it["audio"].shape == (1, SR * 3 // 4) and it["valid_samples"] == SR // 2
    assert it["seconds_start"] == 0 and it["seconds_total"] == 1
    assert it["caption"] == "stereo tone" and it["item_id"] == it["file_name"] == "audio/good.flac"
    assert it["index"] == 1 and it["audio"][:, SR // 2:].abs().max() == 0
    full = ds[0]
    assert full["valid_samples"] == SR * 3 // 4
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["audio"].shape == (2, 1, SR * 3 // 4)

    crop = af.AudioFolderDataset(ds.rows, SR, 1, SR, crop_samples=SR // 10, crop_seed=3)
    a, b = crop[0], crop[0]
    assert torch.equal(a["audio"], b["audio"]) and a["audio"].shape == (1, SR // 10)
    assert a["valid_samples"] == SR // 10 and a["seconds_total"] == 1
    long_crop = af.AudioFolderDataset(ds.rows, SR, 1, SR, crop_samples=SR)
    it = long_crop[1]  # 0.5 s file, 1 s crop -> padded
    assert it["audio"].shape == (1, SR) and it["valid_samples"] == SR // 2


def test_seconds_total_uses_original_length(tmp_path):
    sf.write(tmp_path / "long.wav", _tone(int(2.5 * SR)), SR)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "long.wav", "caption": "c"}\n')
    ds = af.AudioFolderDataset.from_folder(tmp_path, SR, 1, SR)
    it = ds[0]
    assert it["valid_samples"] == SR and it["seconds_total"] == math.ceil(2.5)


def test_rendered_corpus_is_ingestible(tmp_path):
    from musicattr.data.corpus import render_corpus
    render_corpus(str(tmp_path), n_tracks=2, seed=0, sample_rate=8000, workers=1,
                  max_seconds=3.0, n_planted=1, planted_copies=1)
    good, bad = af.scan_audio_folder(tmp_path, SR, 1, 3 * SR, strict=True)
    assert len(good) == 3 and bad == []
    ds = af.AudioFolderDataset(good, SR, 1, 3 * SR)
    it = ds[0]
    assert it["audio"].shape == (1, 3 * SR) and 0 < it["valid_samples"] <= 3 * SR
    assert it["seconds_total"] == math.ceil(good[0]["duration_s"])


def _folder_with(root, rows):
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_file_name_outside_the_folder_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "audio").mkdir(parents=True)
    sf.write(data / "audio/a.wav", _tone(SR), SR)
    sf.write(tmp_path / "outside.wav", _tone(SR), SR)
    outside = ["../outside.wav", str(tmp_path / "outside.wav"), "audio/../../outside.wav",
               "/elsewhere/x.wav"]
    _folder_with(data, [{"file_name": "audio/a.wav", "caption": "in"}]
                 + [{"file_name": n, "caption": "out"} for n in outside])
    good, bad = af.scan_audio_folder(data, SR, 1, SR)
    assert [r["file_name"] for r in good] == ["audio/a.wav"]
    assert [b.file_name for b in bad] == outside
    meta = str(data.resolve() / "metadata.jsonl")
    for row, b in enumerate(bad, 2):
        assert b.problem.startswith("file_name outside the folder")
        assert f"row {row} of {meta}" in b.message() and "--model.allow_outside true" in b.fix
        assert "move the file into the folder" in b.fix
    with pytest.raises(af.BadInputError, match="audio/../../outside.wav: file_name outside"):
        af.scan_audio_folder(data, SR, 1, SR, strict=True)
    rep = af.write_skip_report(tmp_path / "skipped.json", bad)
    assert rep["by_problem"] == {"file_name outside the folder": 4}

    good, bad = af.scan_audio_folder(data, SR, 1, SR, allow_outside=True)  # opt in
    assert [r["file_name"] for r in good] == ["audio/a.wav", "../outside.wav"]
    assert good[1]["path"] == str(data.resolve() / "../outside.wav")
    assert [(b.file_name, b.problem.split(" (")[0]) for b in bad] == [
        (outside[1], "duplicate file_name"), (outside[2], "duplicate file_name"),
        ("/elsewhere/x.wav", "file not found")]
    ds = af.AudioFolderDataset.from_folder(data, SR, 1, SR, allow_outside=True)
    assert len(ds) == 2 and ds[1]["valid_samples"] == SR
    assert len(af.AudioFolderDataset.from_folder(data, SR, 1, SR)) == 1


def test_symlinks_inside_the_folder_are_allowed(tmp_path):
    """Like the Hugging Face cache: files and folders inside are symlinks to blobs elsewhere."""
    blobs, data = tmp_path / "blobs", tmp_path / "data"
    blobs.mkdir()
    (data / "audio").mkdir(parents=True)
    sf.write(blobs / "b1", _tone(SR), SR, format="WAV")
    sf.write(blobs / "dir_b.flac", _tone(SR // 2), SR)
    os.symlink(blobs / "b1", data / "audio/linked.wav")
    os.symlink(blobs, data / "linked_dir")
    _folder_with(data, [{"file_name": "audio/linked.wav", "caption": "file link"},
                        {"file_name": "linked_dir/dir_b.flac", "caption": "dir link"}])
    good, bad = af.scan_audio_folder(data, SR, 1, SR, strict=True)
    assert bad == [] and [r["num_samples"] for r in good] == [SR, SR // 2]
    assert good[0]["path"] == str(data.resolve() / "audio/linked.wav")


def test_same_file_under_two_names_is_a_duplicate(tmp_path):
    a = tmp_path / "audio"
    a.mkdir()
    for n in ("a.wav", "b.wav", "c.wav"):
        sf.write(a / n, _tone(SR), SR)
    os.symlink(a / "b.wav", a / "link1.wav")
    os.symlink("b.wav", a / "link2.wav")  # relative link, same target
    os.symlink(a / "c.wav", a / "to_c.wav")
    names = ["audio/a.wav", "audio/../audio/a.wav", "audio/./a.wav",  # rows 1-3
             "audio/link1.wav", "audio/link2.wav", "audio/b.wav",  # rows 4-6: links then target
             "audio/c.wav", "audio/to_c.wav"]  # rows 7-8: target then link
    _folder_with(tmp_path, [{"file_name": n, "caption": f"row {i}"} for i, n in enumerate(names)])
    good, bad = af.scan_audio_folder(tmp_path, SR, 1, SR)
    assert [r["file_name"] for r in good] == ["audio/a.wav", "audio/link1.wav", "audio/c.wav"]
    first = {"audio/../audio/a.wav": 1, "audio/./a.wav": 1, "audio/link2.wav": 4,
             "audio/b.wav": 4, "audio/to_c.wav": 7}
    assert [b.file_name for b in bad] == list(first)
    for b in bad:  # exactly the existing duplicate report
        assert b.problem == f"duplicate file_name (first listed on row {first[b.file_name]})"
        assert b.fix == "list each file once; keep one caption per file"
    rep = af.write_skip_report(tmp_path / "r.json", bad)
    assert rep["by_problem"] == {"duplicate file_name": 5}


def test_corrupt_mp3_does_not_leak_mpg123_notes(tmp_path, capfd):
    rng = np.random.default_rng(0)
    (tmp_path / "bad.mp3").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    sf.write(tmp_path / "ok.wav", _tone(SR), SR)
    with pytest.raises(sf.LibsndfileError):  # control: plain soundfile leaks the note to fd 2
        sf.info(str(tmp_path / "bad.mp3"))
    assert "Illegal Audio-MPEG-Header" in capfd.readouterr().err
    _folder_with(tmp_path, [{"file_name": "bad.mp3", "caption": "x"},
                            {"file_name": "ok.wav", "caption": "y"}])
    good, bad = af.scan_audio_folder(tmp_path, SR, 1, SR)
    assert [r["file_name"] for r in good] == ["ok.wav"]
    assert [b.file_name for b in bad] == ["bad.mp3"]
    assert bad[0].problem.startswith("unreadable or corrupt") and bad[0].fix
    with pytest.raises(af.BadAudioError, match="bad.mp3: unreadable or corrupt"):
        af.read_audio(tmp_path / "bad.mp3", SR, 1)
    assert "MPEG" not in capfd.readouterr().err
    os.write(2, b"stderr still works\n")
    assert capfd.readouterr().err == "stderr still works\n"


def test_quiet_c_stderr_swallows_fd2_and_restores_it(capfd):
    with af.quiet_c_stderr():
        os.write(2, b"hidden 1\n")
        with af.quiet_c_stderr():  # nested
            os.write(2, b"hidden 2\n")
        os.write(2, b"hidden 3\n")
    os.write(2, b"shown 1\n")
    with pytest.raises(RuntimeError, match="boom"):
        with af.quiet_c_stderr():
            os.write(2, b"hidden 4\n")
            raise RuntimeError("boom")
    os.write(2, b"shown 2\n")
    assert capfd.readouterr().err == "shown 1\nshown 2\n"

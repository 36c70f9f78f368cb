"""Representation health: latent spread, chroma similarity, the reconstruction check and the store record."""
import json
import logging

import numpy as np
import pytest
import torch

from musicattr.models.health import (MIN_SPREAD, check_spread, chroma, chroma_similarity, latent_spread,
                                     reconstruction_health)

SR = 16000


def notes(pitches, seconds=0.5):
    """A melody of sine notes (MIDI pitches), mono float32."""
    t = np.arange(int(seconds * SR)) / SR
    return np.concatenate([0.5 * np.sin(2 * np.pi * 440 * 2 ** ((p - 69) / 12) * t) for p in pitches]).astype(np.float32)


def test_latent_spread_is_zero_for_a_collapsed_encoder_and_one_for_white_latents():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(16, 1, generator=g) * 3  # one latent per channel, shared by every item and frame
    collapsed = [mu.expand(16, 40) + 1e-3 * torch.randn(16, 40, generator=g) for _ in range(10)]
    assert latent_spread(collapsed) < 1e-5
    healthy = [torch.randn(16, 40, generator=g) for _ in range(10)]
    assert latent_spread(healthy) == pytest.approx(1.0, abs=0.05)
    # per channel: constant channels with different means across channels are still a collapse
    assert latent_spread([torch.arange(16.0)[:, None].expand(16, 30)]) == pytest.approx(0.0, abs=1e-12)


def test_check_spread_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert not check_spread(MIN_SPREAD / 2, "ae.ckpt")
    assert "collapsed" in caplog.text and "ae.ckpt" in caplog.text
    assert check_spread(0.5, "ae.ckpt")


def test_chroma_similarity_time_aligned_and_silence():
    melody = notes([60, 64, 67, 72])
    other = notes([61, 66, 70, 63])
    c = chroma(melody, SR)
    assert chroma_similarity(c, c) == pytest.approx(1.0, abs=1e-6)
    assert chroma_similarity(c, chroma(other, SR)) < 0.5
    # a reference shorter than the query counts as silence past its end
    half = chroma(melody[: len(melody) // 2], SR)
    assert 0.4 < chroma_similarity(c, half) < 0.6
    # silent query frames carry no pitch and are not averaged
    padded = np.concatenate([melody, np.zeros(SR, np.float32)])
    assert chroma_similarity(chroma(padded, SR), c) == pytest.approx(1.0, abs=0.05)
    assert chroma_similarity(chroma(np.zeros(SR, np.float32), SR), c) == 0.0


class IdentityAE(torch.nn.Module):
    """encode/decode as the identity on audio (a perfect autoencoder), or a constant decoder (collapsed)."""

    def __init__(self, collapsed=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.collapsed = collapsed
        self.downsampling_ratio = 512

    def encode_mean(self, x):
        return x

    def decode(self, z):
        return torch.full_like(z, 0.1) + 0.1 * torch.sin(torch.arange(z.shape[-1]) * 0.05) if self.collapsed else z


def test_reconstruction_health_separates_a_perfect_and_a_collapsed_autoencoder():
    tracks = [torch.from_numpy(notes(p))[None] for p in ([60, 64, 67], [62, 65, 69], [61, 66, 70], [59, 63, 68])]
    good = reconstruction_health(IdentityAE(), tracks, SR)
    assert good["chroma_own"] > 0.99 and good["chroma_margin"] > 0.3 and good["mrstft"] < 1e-3
    bad = reconstruction_health(IdentityAE(collapsed=True), tracks, SR)
    assert abs(bad["chroma_own"] - bad["chroma_other"]) < 0.1 and bad["mrstft"] > good["mrstft"]


def test_record_store_health_writes_the_manifest_and_warns_on_collapse(tmp_path, caplog):
    from conftest import make_store

    from musicattr.data.latent_store import LatentStoreWriter
    from musicattr.models.health import record_store_health

    store = make_store(tmp_path / "ok")
    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "health.json").write_text(json.dumps({"chroma_own": 0.8, "chroma_other": 0.3}))
    h = record_store_health(store.root, str(tmp_path / "ae" / "weights.safetensors"), use_wandb=False)
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["health"] == h and h["latent_spread"] > 0.5 and h["reconstruction"]["chroma_own"] == 0.8
    w = LatentStoreWriter(tmp_path / "collapsed", {"format": 1, "latent_channels": 4, "max_frames": 8})
    lat = np.tile(np.array([1.0, -2.0, 0.5, 3.0], np.float32)[None, :, None], (5, 1, 8))
    items = [{"index": i, "item_id": f"t{i}", "caption": "c", "file_name": f"t{i}.wav", "valid_frames": 8,
              "seconds_start": 0, "seconds_total": 1, "duration_s": 1.0} for i in range(5)]
    w.write_shard("r0-0", lat, np.zeros((5, 1, 3), np.float32), items)
    w.finalize(expected=5)
    with caplog.at_level(logging.WARNING):
        assert record_store_health(tmp_path / "collapsed", use_wandb=False)["latent_spread"] < MIN_SPREAD
    assert "collapsed" in caplog.text

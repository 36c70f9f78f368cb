import pytest
import torch

from musicattr.embeddings.text import build_text_encoder


def test_minilm_is_pretrained_offline_and_deterministic():
    enc = build_text_encoder("minilm")
    a = enc.encode(["a slow chorale played on strings", "a fast fiddle reel", "a slow chorale played on strings"])
    assert a.shape == (3, 1, 384)
    assert torch.allclose(a[0], a[2])
    assert torch.allclose(a.norm(dim=-1), torch.ones(3, 1), atol=1e-5)
    # a trained encoder puts paraphrases closer than unrelated captions (random weights would not)
    b = enc.encode(["a string ensemble plays a slow chorale", "heavy metal guitar riffs"])
    assert float(a[0, 0] @ b[0, 0]) > float(a[0, 0] @ b[1, 0]) + 0.2


def test_clap_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder_checkpoint"):
        build_text_encoder("clap", str(tmp_path / "missing.pt"))


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="minilm"):
        build_text_encoder("t5")

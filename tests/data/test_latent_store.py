import numpy as np
import pytest
import torch

from conftest import make_store
from musicattr.data.datamodules import ShardSampler, collate_items
from musicattr.data.latent_store import LatentStore, LatentStoreWriter, StoreError


def test_round_trip_and_memmap(tmp_path):
    store = make_store(tmp_path / "s", n=11, shard_size=4)
    assert len(store) == 11 and store.latent_shape == (4, 16)
    item = store[7]
    assert item["index"] == 7 and item["item_id"] == "audio/track007.wav"
    assert item["latents"].shape == (4, 16) and item["text_emb"].shape == (1, 32)
    # the padded region holds what was written there (float16 storage)
    assert torch.allclose(item["latents"][:, item["valid_frames"]:], torch.tensor(0.1), atol=1e-3)
    lat, _ = store._shard(store.items.iloc[7]["shard"])
    assert isinstance(lat, np.memmap)
    assert store.position_of("audio/track003.wav") == 3 and store.position_of(5) == 5
    with pytest.raises(KeyError, match="not in the store"):
        store.position_of("nope")


def test_resume_skips_complete_shards_and_ignores_partial(tmp_path):
    root = tmp_path / "s"
    make_store(root, n=10, shard_size=5)
    (root / "index.parquet").unlink()
    # a shard interrupted before its .json was written does not count
    (root / "shards" / "r0-000000005.json").unlink()
    w = LatentStoreWriter(root)
    assert w.done_indices() == set(range(5))
    with pytest.raises(StoreError, match="5 of 10 items encoded"):
        w.finalize(expected=10)
    with pytest.raises(StoreError, match="not a finished latent store"):
        LatentStore(root)


def test_manifest_mismatch_is_refused(tmp_path):
    root = tmp_path / "s"
    make_store(root, n=3)
    with pytest.raises(StoreError, match="other settings"):
        LatentStoreWriter(root, {"format": 1, "latent_channels": 64, "max_frames": 16})


def test_shard_sampler_covers_each_item_once():
    seen = [i for r in range(3) for i in ShardSampler(10, 3, r)]
    assert sorted(seen) == list(range(10))
    assert [len(ShardSampler(10, 3, r)) for r in range(3)] == [4, 3, 3]


def test_collate_keeps_strings(tmp_path):
    store = make_store(tmp_path / "s", n=3)
    b = collate_items([store[0], store[1]])
    assert b["latents"].shape == (2, 4, 16) and b["item_id"] == ["audio/track000.wav", "audio/track001.wav"]
    assert b["valid_frames"].dtype == torch.int64


def test_resolve_reads_a_digit_only_key_as_an_item_id_first(tmp_path):
    ids = ["100", "101", "7", "audio/x.wav"] + [f"{200 + i}" for i in range(4, 9)]
    store = make_store(tmp_path / "s", n=9, item_ids=ids)
    assert store[store.resolve("100")]["item_id"] == "100"  # an item_id, not the (absent) index 100
    assert store[store.resolve("audio/x.wav")]["index"] == 3
    assert store[store.resolve("index:7")]["item_id"] == "207"
    assert store[store.resolve("8")]["item_id"] == "208"  # no item has id '8': the index
    with pytest.raises(ValueError, match="index:7"):  # '7' is the id of index 2 and the index of another item
        store.resolve("7")
    with pytest.raises(KeyError, match="no item"):
        store.resolve("nope")

"""The streamed safetensors writer: the same bytes as safetensors' save_file, read back by safetensors."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musicattr.tensor_file import save_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b": torch.randn(3, 5, generator=g).double(), "a": torch.randn(7, generator=g),
            "c": torch.randint(-5, 5, (4,), generator=g, dtype=torch.int16), "d": torch.randn(2, 2, generator=g).bfloat16(),
            "d2": torch.randn(2, generator=g).half(), "empty": torch.zeros(0), "scalar": torch.tensor(3.0),
            "mask": torch.tensor([True, False]), "i64": torch.arange(3), "i32": torch.arange(3, dtype=torch.int32),
            "u8": torch.arange(3, dtype=torch.uint8), "i8": torch.arange(3, dtype=torch.int8),
            "strided": torch.arange(12.0).reshape(3, 4).t()}


@pytest.mark.parametrize("metadata", [None, {"indices": "[0, 1]", "reduce": "sum"}])
def test_same_bytes_as_save_file_and_read_back(tmp_path, metadata):
    ts = _tensors()
    save_tensors(ts, tmp_path / "x.safetensors", metadata)
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "y.safetensors"), metadata=metadata)
    if metadata is None:   # with metadata, save_file orders its keys by a hash map (not deterministic)
        assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == metadata
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_unknown_dtype_is_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match="complex.*fix: cast"):
        save_tensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")


def test_reader_gives_what_safetensors_gives(tmp_path):
    from musicattr.tensor_file import TensorFileReader

    ts = _tensors()
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "y.safetensors"), metadata={"m": "1"})
    with TensorFileReader(tmp_path / "y.safetensors") as r:
        assert sorted(r.keys()) == sorted(ts) and r.metadata == {"m": "1"}
        for k, v in ts.items():
            got = r.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "y.safetensors").read_bytes()[:-8])
    with TensorFileReader(tmp_path / "cut.safetensors") as r, pytest.raises(OSError, match="truncated.*fix"):
        for k in r.keys():
            r.get_tensor(k)


def test_metadata_alone_from_the_header(tmp_path):
    from musicattr.tensor_file import read_metadata

    save_file({"w": torch.zeros(3)}, str(tmp_path / "m.safetensors"), metadata={"lr": "1e-6"})
    save_file({"w": torch.zeros(3)}, str(tmp_path / "n.safetensors"))
    assert read_metadata(tmp_path / "m.safetensors") == {"lr": "1e-6"} and read_metadata(tmp_path / "n.safetensors") is None

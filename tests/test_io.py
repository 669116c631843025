"""The checked readers of ``qlora_trainer.io``: each damaged file is one line naming it, what is wrong
and the fix given by the caller."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from qlora_trainer.errors import DataError, QloraError
from qlora_trainer.io import check_safetensors, read_json_object, read_safetensors, read_text, read_torch


def test_safetensors_whole_truncated_and_padded(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(f))
    assert torch.equal(read_safetensors(f, "FIX")["a"], torch.arange(6.0).reshape(2, 3))
    data = f.read_bytes()
    f.write_bytes(data[:-4])
    with pytest.raises(QloraError, match=rf"^{f}: truncated \({len(data) - 4} of {len(data)} bytes\); FIX$"):
        check_safetensors(f, "FIX")
    f.write_bytes(data[:5])
    with pytest.raises(QloraError, match=r"not a safetensors file or truncated \(5 bytes\); FIX$"):
        read_safetensors(f, "FIX")
    f.write_bytes(data + b"xx")
    with pytest.raises(QloraError, match=r"2 bytes after its last tensor"):
        read_safetensors(f, "FIX")
    with pytest.raises(QloraError, match=rf"^{tmp_path / 'none.safetensors'}: file not found; FIX$"):
        read_safetensors(tmp_path / "none.safetensors", "FIX")


def test_torch_file_cut_short(tmp_path):
    f = tmp_path / "optimizer.pt"
    torch.save({"x": torch.ones(100)}, f)
    assert torch.equal(read_torch(f, "FIX")["x"], torch.ones(100))
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(QloraError, match=rf"^{f}: cannot be loaded \(.*\); FIX$"):
        read_torch(f, "FIX")


def test_text_and_json(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"a": [1, 2')
    with pytest.raises(QloraError, match=r"line 1: invalid JSON \(.*\) \(the file ends early: cut short\?\); FIX$"):
        read_json_object(f, fix="FIX")
    f.write_bytes(b"ok\n\xff\n")
    with pytest.raises(DataError, match=rf"^{f}:2: not valid UTF-8 \(byte 3\); FIX$"):
        read_text(f, "FIX", DataError)
    f.write_text("a: 1\nb: 2")
    assert read_text(f) == "a: 1\nb: 2"
    with pytest.raises(QloraError, match=r"is cut short \(its last line, 2, is incomplete\); FIX$"):
        read_text(f, "FIX", whole_lines=True)

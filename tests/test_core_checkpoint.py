from __future__ import annotations

import json

import pytest
import torch

from core.checkpoint import (
    CheckpointError,
    checkpoint_config,
    checkpoint_metadata,
    load_checkpoint,
    load_state_strict,
    save_checkpoint,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(4, 3, generator=g),
            "b": torch.randn(3, generator=g).to(torch.bfloat16),
            "steps": torch.tensor([5], dtype=torch.int64),
        },
        "head": {"proj": torch.randn(2, 2, generator=g).t()},  # non-contiguous on purpose
    }


def test_round_trip_is_exact(tmp_path):
    tensors = _tensors()
    save_checkpoint(tmp_path / "ckpt", tensors, {"hidden": 4}, {"step": 10})
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config == {"hidden": 4}
    assert ckpt.metadata == {"step": 10}
    assert set(ckpt.tensors) == {"model", "head"}
    for stem, state in tensors.items():
        for key, value in state.items():
            loaded = ckpt.tensors[stem][key]
            assert loaded.dtype == value.dtype
            assert torch.equal(loaded, value)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "head.safetensors"}
    assert all(len(info["sha256"]) == 64 for info in manifest["files"].values())


def test_config_and_metadata_read_the_manifest_alone(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _tensors(), {"hidden": 4}, {"step": 10})
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a tensor file")
    assert checkpoint_config(tmp_path / "ckpt") == {"hidden": 4}  # no file hashed or read
    assert checkpoint_metadata(tmp_path / "ckpt") == {"step": 10}
    with pytest.raises(CheckpointError, match="bytes"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        checkpoint_config(tmp_path / "nowhere")


def test_corrupted_file_names_file_and_expected_hash(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _tensors(), {})
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    expected = manifest["files"]["model.safetensors"]["sha256"]
    path = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=rf"model.safetensors: sha256 mismatch: expected {expected}"
    ):
        load_checkpoint(tmp_path / "ckpt")


def test_truncated_file_names_file_and_expected_size(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _tensors(), {})
    path = tmp_path / "ckpt" / "head.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(
        CheckpointError, match=rf"head.safetensors: expected {size} bytes .*truncated"
    ):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_pieces(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest not found"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "ckpt", _tensors(), {})
    (tmp_path / "ckpt" / "head.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"head\.safetensors: file listed in the manifest is missing"
    ):
        load_checkpoint(tmp_path / "ckpt")


def test_failed_save_leaves_nothing_behind(tmp_path):
    bad = {"model": {"w": torch.zeros(2), "oops": "not a tensor"}}
    with pytest.raises(AttributeError):
        save_checkpoint(tmp_path / "ckpt", bad, {})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_existing_checkpoint_is_kept_unless_overwrite(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _tensors(), {"v": 1})
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "ckpt", _tensors(), {"v": 2})
    assert load_checkpoint(tmp_path / "ckpt").config == {"v": 1}
    save_checkpoint(tmp_path / "ckpt", _tensors(), {"v": 2}, overwrite=True)
    assert load_checkpoint(tmp_path / "ckpt").config == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_state_strict_reports_keys_and_shapes():
    module = torch.nn.Linear(3, 2)
    with pytest.raises(
        CheckpointError, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"
    ):
        load_state_strict(module, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)})
    with pytest.raises(
        CheckpointError, match=r"'weight' expected shape \(2, 3\), received \(3, 2\)"
    ):
        load_state_strict(module, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})
    state = {"weight": torch.ones(2, 3), "bias": torch.full((2,), 2.0)}
    load_state_strict(module, state)
    assert torch.equal(module.weight, state["weight"])

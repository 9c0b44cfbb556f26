"""Checkpoints: save -> load gives identical tensors, outputs and metadata; a failed overwrite keeps the old one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dad_core.checkpoint as checkpoint_module
from dad_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5)).eval()


def _state(model: nn.Module, step: int) -> dict:
    return {"model": model.state_dict(), "step": step, "rng": torch.arange(4, dtype=torch.uint8)}


def test_save_load_round_trip_gives_identical_tensors_outputs_and_meta(tmp_path):
    model = _model(0)
    images = torch.rand(2, 3, 8, 8)
    expected = model(images)
    meta = {"step": 7, "config_hash": "abc123", "metrics": {"top1": 0.5}, "teacher": {"name": "dad-tiny-clip"}}
    path = save_checkpoint(tmp_path / "ckpt", _state(model, 7), meta)
    assert path == tmp_path / "ckpt"
    state, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert state["step"] == 7
    original = model.state_dict()
    assert state["model"].keys() == original.keys()
    assert all(torch.equal(state["model"][k], original[k]) for k in original)
    assert torch.equal(state["rng"], torch.arange(4, dtype=torch.uint8))
    fresh = _model(1)
    fresh(images)  # materialize the lazy layer
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh(images), expected)


def test_meta_defaults_to_empty_and_non_json_values_become_strings(tmp_path):
    save_checkpoint(tmp_path / "a", {"x": torch.ones(1)})
    assert load_checkpoint(tmp_path / "a")[1] == {}
    save_checkpoint(tmp_path / "b", {"x": torch.ones(1)}, {"path": tmp_path})
    assert load_checkpoint(tmp_path / "b")[1] == {"path": str(tmp_path)}


def test_missing_or_incomplete_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "ckpt", {"x": torch.ones(1)}, {"a": 1})
    (tmp_path / "ckpt" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("meta.json", b"{not json"),
        ("state.pt", b"not a torch file"),  # unpickling error
        ("state.pt", b""),  # EOF
        ("state.pt", b"PK\x03\x04truncated zip"),
    ],
)
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, name, content):
    save_checkpoint(tmp_path / "ckpt", {"x": torch.ones(1)}, {"a": 1})
    (tmp_path / "ckpt" / name).write_bytes(content)
    with pytest.raises(CheckpointError, match="ckpt"):
        load_checkpoint(tmp_path / "ckpt")


def test_overwrite_replaces_the_checkpoint_completely(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"x": torch.zeros(2), "old_only": 1}, {"step": 1})
    save_checkpoint(tmp_path / "ckpt", {"x": torch.ones(2)}, {"step": 2})
    state, meta = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(state["x"], torch.ones(2))
    assert "old_only" not in state
    assert meta == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or .old directories


def test_a_failed_overwrite_keeps_the_previous_complete_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", {"x": torch.zeros(2)}, {"step": 1})

    def killed(obj, f, *args, **kwargs):
        f.write(b"partial")  # save_checkpoint hands torch.save an open file
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(checkpoint_module.torch, "save", killed)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(tmp_path / "ckpt", {"x": torch.ones(2)}, {"step": 2})
    monkeypatch.undo()
    state, meta = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(state["x"], torch.zeros(2))
    assert meta == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

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
        ("state.safetensors", b"not a safetensors file"),
        ("state.safetensors", b""),  # empty
        ("state.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated"),
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

    def killed(obj, path):
        path.write_bytes(b"partial")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(checkpoint_module, "save_tree", killed)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(tmp_path / "ckpt", {"x": torch.ones(2)}, {"step": 2})
    monkeypatch.undo()
    state, meta = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(state["x"], torch.zeros(2))
    assert meta == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_training_state_round_trips_without_pickle(tmp_path):
    """Optimizer state (int keys, tuples), numpy and Python RNG states survive the safetensors + JSON format."""
    import random

    import numpy as np

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "numpy": np.random.get_state(), "python": random.getstate()}
    save_checkpoint(tmp_path / "ckpt", state)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["meta.json", "state.safetensors"]
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)
    assert torch.equal(fresh.state[model.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    np.random.set_state(loaded["numpy"])
    random.setstate(loaded["python"])


def test_legacy_state_pt_is_read_with_weights_only(tmp_path):
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "ckpt" / "state.pt")
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    state, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(state["model"]["w"], torch.ones(2))


def test_a_pickle_payload_in_a_checkpoint_never_runs(tmp_path, pickle_bomb):
    (tmp_path / "ckpt").mkdir()
    pickle_bomb.write(tmp_path / "ckpt" / "state.pt", {"model": {"w": torch.ones(2)}})
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"state\.pt: refused.*dad convert-checkpoint") as info:
        load_checkpoint(tmp_path / "ckpt")
    assert "\n" not in str(info.value)
    assert not pickle_bomb.ran

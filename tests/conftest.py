"""Shared fixtures: seeding, a tiny teacher, stub discretizers, offline settings, the gpu marker."""

from __future__ import annotations

import os

# Offline and quiet before anything imports huggingface_hub or mlflow.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest_plugins = ["servers"]  # SeaweedFS / MLflow server fixtures (tests/servers.py)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class TinyTeacher(nn.Module):
    """A small conv classifier with CLIP-like input normalization; takes [0, 1] images."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, images):
        x = (images - self.mean) / self.std
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class PoolDiscretizer:
    """Stub VQGAN: 2x average-pool + nearest upsample, quantized to 8 bits. Same interface as VQGAN."""

    def reconstruct(self, images):
        with torch.no_grad():
            low = F.avg_pool2d(images, 2)
            return (F.interpolate(low, scale_factor=2, mode="nearest") * 255).round().div(255).clamp(0, 1)


@pytest.fixture
def tiny_teacher():
    from dad_core.teacher import freeze

    return freeze(TinyTeacher())


@pytest.fixture
def pool_discretizer():
    return PoolDiscretizer()


@pytest.fixture
def clean_mlflow_state(monkeypatch):
    """No tracking URI from the environment, and no run or URI left behind for the next test (MLflow tests)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The embedded digits prepared once per session (suites with 10 images per class to keep it quick)."""
    from dad_core.config import load_config
    from dad_core.prepare import prepare_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(root, load_config(None, ["data.suite_per_class=10"]).data, progress=False)
    return root


@pytest.fixture(scope="session")
def digits_teacher(digits_root, tmp_path_factory):
    """The tiny CLIP teacher fine-tuned on the digits once per session (plain fine-tuning: quick and accurate)."""
    from dad_core.config import load_config
    from dad_core.finetune import finetune_teacher

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    overrides = ["finetune.epochs=4", "finetune.augment=none", "finetune.eval_suites=false"]
    finetune_teacher(load_config(None, overrides), digits_root, path, progress=False)
    return path


class _Payload:
    """Unpickling this runs ``touch <marker>``: the live attack that a safe loader must never execute."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class PickleBomb:
    """A marker path and a way to write torch files that run ``touch marker`` when fully unpickled."""

    def __init__(self, folder) -> None:
        self.marker = folder / "PAYLOAD_RAN"

    def write(self, path, state=None):
        """``torch.save`` a dict holding the payload (and ``state``) to ``path``; proves it is live first."""
        import pickle

        pickle.loads(pickle.dumps(_Payload(self.marker)))
        assert self.marker.exists(), "the payload must run under plain pickle"
        self.marker.unlink()
        torch.save({**(state or {}), "payload": _Payload(self.marker)}, path)
        return path

    @property
    def ran(self) -> bool:
        return self.marker.exists()


@pytest.fixture
def pickle_bomb(tmp_path):
    return PickleBomb(tmp_path)

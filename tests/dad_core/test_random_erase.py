"""``train.reprob``: timm's random erasing (pixel mode) on the student's inputs, in the training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dad_core.config import LossConfig, load_config
from dad_core.student import create_student
from dad_core.task import DADTask, random_erase
from dad_core.tracking import NullTracker

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def _erased_boxes(before: torch.Tensor, after: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Per sample, the bounding box (top, left, height, width) of the pixels that changed, or None."""
    out = []
    for changed in (before != after).any(dim=1):
        if not changed.any():
            out.append(None)
            continue
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        out.append((int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)))
    return out


def test_every_sample_gets_one_box_of_timms_sizes_filled_with_normalized_noise():
    clean, dad = torch.full((200, 3, 32, 32), 0.5), torch.full((200, 3, 32, 32), 0.25)

    erased_clean, erased_dad = random_erase([clean, dad], prob=1.0, rng=np.random.default_rng(0), mean=MEAN, std=STD)

    assert float(clean.max()) == float(clean.min()) == 0.5  # the inputs are left alone
    boxes = _erased_boxes(clean, erased_clean)
    assert all(box is not None for box in boxes)
    assert boxes == _erased_boxes(dad, erased_dad)  # a clean image and its DAD sample share the box
    fractions = np.array([h * w / (32 * 32) for _, _, h, w in boxes])
    assert fractions.min() >= 0.015 and fractions.max() <= 0.36  # 2-33 % of the area, up to rounding
    aspects = np.array([h / w for _, _, h, w in boxes])
    assert aspects.min() >= 0.2 and aspects.max() <= 5  # 0.3-3.3, up to rounding on a 32-px grid
    noise = [erased_clean[i, :, top : top + h, left : left + w] for i, (top, left, h, w) in enumerate(boxes)]
    inside = torch.cat([((x - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1)).flatten() for x in noise])
    assert abs(float(inside.mean())) < 0.1 and abs(float(inside.std()) - 1) < 0.1  # N(0, 1) once normalized
    assert not torch.equal(erased_clean[0], erased_dad[0] + 0.25)  # each tensor draws its own noise


def test_the_host_copies_do_not_wait_for_the_gpu(monkeypatch):
    """The boxes (drawn on the host every step) and the normalization go to the device pinned and non-blocking."""
    from dad_core import task
    from dad_core.distributed import copy_to_device

    copied = []
    monkeypatch.setattr(task, "copy_to_device", lambda t, device: copied.append(t.shape) or copy_to_device(t, device))
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: tensor(*a, **k) if "device" not in k else pytest.fail(str(k)))

    random_erase([torch.rand(8, 3, 16, 16)], prob=1.0, rng=np.random.default_rng(0), mean=MEAN, std=STD)

    assert copied == [(8, 5), (1, 3, 1, 1), (1, 3, 1, 1)]  # the boxes, the mean, the std


def test_the_probability_and_the_rng_decide_which_and_where():
    images = torch.rand(400, 3, 16, 16)
    again = random_erase([images], prob=0.25, rng=np.random.default_rng(7), mean=MEAN, std=STD)[0]
    erased = random_erase([images], prob=0.25, rng=np.random.default_rng(7), mean=MEAN, std=STD)[0]
    assert torch.equal(again, erased)  # the run's checkpointed RNG: a resumed run erases the same boxes
    hit = sum(box is not None for box in _erased_boxes(images, erased))
    assert 70 <= hit <= 130  # about a quarter
    assert random_erase([images], prob=0.0, rng=np.random.default_rng(7), mean=MEAN, std=STD)[0] is images
    last = images.contiguous(memory_format=torch.channels_last)  # the training step's format on a GPU
    erased_last = random_erase([last], prob=0.25, rng=np.random.default_rng(7), mean=MEAN, std=STD)[0]
    assert erased_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(erased_last != last, erased != images)  # the same boxes (the noise fills memory in order)


def test_the_task_erases_the_students_inputs_only_and_only_in_training():
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.fc = name, torch.nn.Linear(3 * 8 * 8, 10)

        def forward(self, x):
            seen.setdefault(self.name, []).append(x.clone())
            return self.fc(x.flatten(1))

    batch = {"clean": torch.full((6, 3, 8, 8), 0.5), "dad": torch.full((6, 3, 8, 8), 0.5), "label": torch.arange(6)}
    task = DADTask(Spy("student"), LossConfig(), num_classes=10, teacher=Spy("teacher"), reprob=1.0)

    task.train()(batch, rng=np.random.default_rng(0))

    assert all(float(x.min()) == float(x.max()) == 0.5 for x in seen["teacher"])  # soft labels of the unerased
    assert len(seen["student"]) == 1 and bool((seen["student"][0] != 0.5).any(dim=(1, 2, 3)).all())
    seen.clear()
    task.eval()(batch, rng=np.random.default_rng(0))
    assert float(seen["student"][0].min()) == float(seen["student"][0].max()) == 0.5


def test_training_uses_train_reprob(digits_root, tmp_path, monkeypatch):
    """The key is wired through: fit erases with it, with the student's own normalization."""
    import dad_core.task
    from dad_core.train import fit

    calls = []
    original = dad_core.task.random_erase

    def spy(tensors, **kwargs):
        calls.append(kwargs)
        return original(tensors, **kwargs)

    monkeypatch.setattr(dad_core.task, "random_erase", spy)
    overrides = ["train.model=test_resnet", "train.batch_size=96", "train.epochs=1", "loss.kd_weight=0"]
    cfg = load_config(None, [*overrides, "train.reprob=0.25"])
    fit(cfg, digits_root, None, tmp_path / "run", progress=False, tracker=NullTracker(), stop_after_steps=2)

    assert len(calls) == 2 and {c["prob"] for c in calls} == {0.25}
    student = create_student("test_resnet", 10)
    torch.testing.assert_close(calls[0]["std"], student.std.flatten())  # test_resnet's pretrained_cfg, not ImageNet's
    torch.testing.assert_close(calls[0]["mean"], student.mean.flatten())
    calls.clear()
    fit(load_config(None, overrides), digits_root, None, tmp_path / "off", progress=False, tracker=NullTracker(),
        stop_after_steps=1)  # fmt: skip
    assert calls == []  # nothing is erased without it

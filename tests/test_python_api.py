"""The library from Python, as a user would drive it: teacher, VQGAN, DAD samples from a folder, the DAD loss."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import dad_core
from dad_core.config import load_config
from dad_core.data import ClassList, create_eval_transform


def test_dad_samples_and_loss_from_a_folder_of_images(tmp_path):
    classes = ClassList(("cat", "dog"), ("cat", "dog"))
    rng = np.random.default_rng(0)
    for name in classes.ids:
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    dataset = dad_core.ImageFolderDataset.from_folder(tmp_path, classes, create_eval_transform(32))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)

    teacher = dad_core.create_clip_teacher("dad-tiny-clip", classnames=classes.names, templates="plain")
    vqgan = dad_core.VQGAN.from_config("tiny-f4")
    cfg = load_config(None, [])
    dad = dad_core.generate_dad_samples(teacher, vqgan, images, labels, cfg.attack)
    assert dad.shape == images.shape and 0 <= dad.min() and dad.max() <= 1

    student = dad_core.create_student("resnet10t", num_classes=2)
    loss = dad_core.DADLoss(cfg.loss)
    with torch.no_grad():
        t_clean, t_dad = (torch.softmax(teacher(x) / cfg.loss.temperature, -1) for x in (images, dad))
    out = loss(student(images), labels, t_clean, student_dad=student(dad), teacher_dad=t_dad)
    assert set(out) == {"loss", "ce", "kd_clean", "kd_dad"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(p.grad is not None for p in student.parameters())

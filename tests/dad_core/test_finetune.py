"""Teacher fine-tuning (dad_core.finetune) on the embedded digits: it beats the zero-shot head by a wide margin, the
checkpoint reproduces the reported accuracy, WiSE-FT interpolation has the right end points, the broad augmentation
touches only training batches and never the held-out evaluation shifts, and the report states the suites' top-1."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import dad_core.finetune
from dad_core import corruptions
from dad_core.config import ConfigError, load_config
from dad_core.data import create_eval_transform, open_split, read_classes
from dad_core.distributed import set_seed
from dad_core.finetune import accuracy, broad_augment, finetune_teacher, wise_interpolate
from dad_core.serialization import load_tree
from dad_core.teacher import create_clip_classifier, create_clip_teacher

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved(digits_teacher):
    """The checkpoint the session fixture wrote (4 epochs, no augmentation): state dict, class list and accuracies."""
    return load_tree(digits_teacher)


@pytest.fixture(scope="module")
def val_loader(digits_root):
    return DataLoader(open_split(digits_root, "val", create_eval_transform(32)), batch_size=256)


@pytest.fixture(scope="module")
def zero_shot(digits_root):
    """The zero-shot classifier fine-tuning started from: same config, same seed."""
    cfg = load_config(None, [])
    set_seed(cfg.finetune.seed)
    names = list(read_classes(digits_root / "classes.txt").names)
    return create_clip_classifier(cfg.teacher.model_name, cfg.teacher.pretrained, names, cfg.teacher.templates)


def test_fine_tuning_beats_zero_shot_by_a_wide_margin(saved):
    # dad-tiny-clip has random weights offline, so zero-shot is about chance (9.8 % here); four epochs reach 94.2 %.
    assert saved["zero_shot_top1"] < 25
    assert saved["top1"] > 85
    assert saved["top1"] > saved["zero_shot_top1"] + 60


def test_the_checkpoint_gives_the_reported_val_accuracy(digits_root, digits_teacher, saved, val_loader):
    names = read_classes(digits_root / "classes.txt").names
    assert saved["classnames"] == list(names) and saved["model_name"] == "dad-tiny-clip"
    teacher = create_clip_teacher(checkpoint=digits_teacher, classnames=list(names))
    assert accuracy(teacher, val_loader, CPU) == pytest.approx(saved["top1"], abs=1e-9)


def test_the_zero_shot_start_is_reproducible(zero_shot, saved, val_loader):
    assert accuracy(zero_shot, val_loader, CPU) == pytest.approx(saved["zero_shot_top1"], abs=1e-9)


def test_wise_interpolation_end_points_and_midpoint(zero_shot, saved, val_loader):
    zs = {k: v.clone() for k, v in zero_shot.state_dict().items()}
    ft = saved["state_dict"]
    assert zs.keys() == ft.keys()
    floats = [k for k, v in ft.items() if v.is_floating_point()]
    others = [k for k, v in ft.items() if not v.is_floating_point()]
    assert others  # BatchNorm counters: taken from the fine-tuned weights, never averaged
    changed = [k for k in floats if not torch.equal(zs[k], ft[k])]
    assert len(changed) > len(floats) // 2  # fine-tuning moved the weights: the end points are distinguishable

    at0, at1, half = (wise_interpolate(zs, ft, alpha) for alpha in (0.0, 1.0, 0.5))
    assert all(torch.equal(at0[k], zs[k]) for k in floats)
    assert all(torch.equal(at1[k], ft[k]) for k in floats)
    for k in floats:
        torch.testing.assert_close(half[k], (zs[k] + ft[k]) / 2)
    assert all(torch.equal(m[k], ft[k]) for m in (at0, at1, half) for k in others)

    zero_shot.load_state_dict(at0)
    assert accuracy(zero_shot, val_loader, CPU) == pytest.approx(saved["zero_shot_top1"], abs=1e-9)
    zero_shot.load_state_dict(at1)
    assert accuracy(zero_shot, val_loader, CPU) == pytest.approx(saved["top1"], abs=1e-9)
    zero_shot.load_state_dict(zs)


def test_broad_augment_is_seeded_bounded_and_keeps_the_shape():
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = images.clone()
    first = broad_augment(images, generator=torch.Generator().manual_seed(7))
    again = broad_augment(images, generator=torch.Generator().manual_seed(7))
    other = broad_augment(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(images, before)  # the input is not modified
    assert first.shape == images.shape and first.dtype == images.dtype
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    changed = (first - images).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.8  # nearly every image gets at least one shift


def test_an_unknown_augment_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="augment.*'flip'"):
        load_config(None, ["finetune.augment=flip"])


def _forbid_held_out_shifts(monkeypatch):
    """Every digits-C corruption and digits-R rendition (and their dispatchers) raises when called."""

    def held_out(*args, **kwargs):
        raise AssertionError("an evaluation shift was applied during fine-tuning")

    for table in (corruptions.CORRUPTIONS, corruptions.RENDITIONS):
        for name, fn in table.items():
            monkeypatch.setitem(table, name, held_out)
            monkeypatch.setattr(corruptions, fn.__name__, held_out)
    monkeypatch.setattr(corruptions, "corrupt", held_out)
    monkeypatch.setattr(corruptions, "apply_rendition", held_out)


@pytest.mark.parametrize("augment", ["broad", "none"])
def test_augmentation_is_training_only_and_never_uses_the_held_out_shifts(digits_root, tmp_path, monkeypatch, augment):
    _forbid_held_out_shifts(monkeypatch)
    batches = []

    def recording(images, *, generator):
        out = broad_augment(images, generator=generator)
        batches.append((images.shape, float(out.min()), float(out.max())))
        return out

    monkeypatch.setattr(dad_core.finetune, "broad_augment", recording)
    evaluate = augment == "broad"  # one suite evaluation is enough and keeps the test quick
    overrides = ["finetune.epochs=1", f"finetune.augment={augment}", f"finetune.eval_suites={str(evaluate).lower()}"]
    cfg = load_config(None, overrides)
    report = finetune_teacher(cfg, digits_root, tmp_path / "teacher.safetensors", progress=False)

    # one call per training step, on training batches only: never on validation or the suites
    assert len(batches) == (report["steps"] if augment == "broad" else 0)
    assert all(shape == (cfg.finetune.batch_size, 3, 32, 32) and 0 <= lo and hi <= 1 for shape, lo, hi in batches)
    assert report["augment"] == augment
    saved = load_tree(report["output"])
    assert saved["augment"] == augment
    if not evaluate:
        assert "suites" not in report and "suites" not in saved
        return
    # the report states the teacher's own top-1 on the clean and shifted suites, and so does the checkpoint
    assert set(report["suites"]) == {"digits-val", "digits-c", "digits-r"}
    assert report["clean_top1"] == pytest.approx(report["top1"], abs=1e-9)  # digits-val is the val split
    assert all(0 <= top1 <= 100 for top1 in report["suites"].values())
    ood = (report["suites"]["digits-c"] + report["suites"]["digits-r"]) / 2
    assert report["ood_mean_top1"] == pytest.approx(ood)
    assert saved["suites"] == report["suites"]
    assert (saved["clean_top1"], saved["ood_mean_top1"]) == (report["clean_top1"], report["ood_mean_top1"])

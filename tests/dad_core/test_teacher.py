"""The CLIP teacher: open_clip's own zero-shot head, logit_scale x cosine, internal normalization, frozen, loadable.

Uses the 32-px ``dad-tiny-clip`` config shipped with dad_core, random weights, three classes, one template.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dad_core.teacher import (
    CLIPClassifier,
    FrozenTeacher,
    TeacherCheckpointError,
    create_clip_classifier,
    create_clip_teacher,
    get_templates,
    save_teacher_checkpoint,
)

open_clip = pytest.importorskip("open_clip")

MODEL = "dad-tiny-clip"
CLASSNAMES = ("zero", "one", "two")
SEED = 1234


def _open_clip_model(seed: int):
    """The plain open_clip model, built from the same seed as the classifier under test."""
    torch.manual_seed(seed)
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    return model.eval()


@functools.cache
def _tokenizer():
    return open_clip.get_tokenizer(MODEL)


def _zero_shot_head(model, templates: str = "plain") -> torch.Tensor:
    return open_clip.build_zero_shot_classifier(model, _tokenizer(), CLASSNAMES, get_templates(templates))  # [D, C]


@pytest.fixture(scope="module")
def classifier() -> CLIPClassifier:
    torch.manual_seed(SEED)
    return create_clip_classifier(MODEL, None, CLASSNAMES, "plain").eval()


@pytest.fixture(scope="module")
def reference(classifier):  # after `classifier`, which registers the tiny model config with open_clip
    return _open_clip_model(SEED)


@pytest.fixture(scope="module")
def reference_head(reference):
    with torch.no_grad():
        return _zero_shot_head(reference)


@pytest.fixture(scope="module")
def fresh_simple(classifier):
    """A classifier as create_clip_classifier returns it, with the 7 'simple' templates."""
    torch.manual_seed(SEED)
    return create_clip_classifier(MODEL, None, CLASSNAMES, "simple")


@pytest.fixture(scope="module")
def teacher(classifier):
    torch.manual_seed(SEED)
    return create_clip_teacher(MODEL, None, None, CLASSNAMES, "plain")


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n * size))


def _assert_same_weights(module_a, module_b):
    a, b = module_a.state_dict(), module_b.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_the_same_tower(classifier, reference):
    _assert_same_weights(classifier.visual, reference.visual)


def test_head_equals_open_clip_zero_shot_classifier(classifier, reference_head):
    assert classifier.head.shape == reference_head.t().shape == (len(CLASSNAMES), reference_head.shape[0])
    torch.testing.assert_close(classifier.head.detach(), reference_head.t(), rtol=0, atol=1e-6)


def test_head_with_several_templates_equals_open_clip(fresh_simple, reference):
    with torch.no_grad():
        expected = _zero_shot_head(reference, "simple").t()
    torch.testing.assert_close(fresh_simple.head.detach(), expected, rtol=0, atol=1e-6)


def test_logits_are_logit_scale_times_cosine(classifier, reference, reference_head):
    images = _images()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = reference.encode_image((images - mean) / std, normalize=True)
        expected = reference.logit_scale.exp() * features @ reference_head
        logits = classifier(images)
        assert float(classifier.logit_scale) == pytest.approx(float(reference.logit_scale.exp()))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # Cosine: every logit is bounded by the scale.
    assert logits.abs().max() <= classifier.logit_scale + 1e-4


def test_input_normalization_happens_inside(classifier):
    images = _images()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(classifier.mean, mean)
    assert torch.allclose(classifier.std, std)
    with torch.no_grad():
        head = F.normalize(classifier.head, dim=-1)
        manual = F.normalize(classifier.visual((images - mean) / std), dim=-1) @ head.t()
        torch.testing.assert_close(classifier(images), classifier.logit_scale * manual, rtol=1e-5, atol=1e-5)
        # Feeding raw [0, 1] pixels to the tower (the reference's bug) gives something else.
        raw = F.normalize(classifier.visual(images), dim=-1) @ head.t()
        assert not torch.allclose(classifier(images), classifier.logit_scale * raw, atol=1e-3)


def test_other_resolutions_are_resized_to_the_tower(classifier):
    with torch.no_grad():
        logits = classifier(_images(2, 48))
    assert logits.shape == (2, len(CLASSNAMES))
    assert torch.isfinite(logits).all()


def test_teacher_is_frozen_and_stays_in_eval(teacher):
    assert isinstance(teacher, FrozenTeacher)
    assert not isinstance(teacher, DistributedDataParallel)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.train() is teacher
    assert not any(m.training for m in teacher.modules())
    assert teacher.classnames == CLASSNAMES
    logits = teacher(_images())
    assert logits.shape == (4, 3)
    assert logits.grad_fn is None


def test_teacher_matches_the_classifier_it_wraps(teacher, classifier):
    with torch.no_grad():
        assert torch.equal(teacher(_images()), classifier(_images()))


def test_classifier_is_built_trainable_and_in_train_mode(fresh_simple):
    assert all(p.requires_grad for p in fresh_simple.parameters())
    assert all(m.training for m in fresh_simple.modules())  # the docstring promises train mode


@pytest.fixture(scope="module")
def finetuned(classifier):
    """The classifier with changed weights, as fine-tuning would leave it."""
    model = copy.deepcopy(classifier)
    with torch.no_grad():
        model.head.add_(0.1 * torch.randn(model.head.shape, generator=torch.Generator().manual_seed(1)))
        next(model.visual.parameters()).mul_(1.5)
    return model


@pytest.fixture(scope="module")
def finetuned_path(finetuned, tmp_path_factory):
    return save_teacher_checkpoint(finetuned, tmp_path_factory.mktemp("teacher") / "teacher.safetensors", {"note": "x"})


@pytest.mark.parametrize("classnames", [CLASSNAMES, None])
def test_saved_teacher_gives_identical_logits(finetuned, finetuned_path, classnames):
    torch.manual_seed(999)  # a different random init underneath: every weight must come from the file
    loaded = create_clip_teacher(MODEL, None, finetuned_path, classnames, "plain")
    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded(images), finetuned(images))
    assert loaded.classnames == CLASSNAMES
    assert not any(p.requires_grad for p in loaded.parameters())


def test_saved_teacher_with_another_class_list_is_refused(finetuned_path):
    with pytest.raises(TeacherCheckpointError, match="do not match"):
        create_clip_teacher(MODEL, None, finetuned_path, ("zero", "one", "three"), "plain")
    with pytest.raises(TeacherCheckpointError, match="do not match"):
        create_clip_teacher(MODEL, None, finetuned_path, CLASSNAMES[:2], "plain")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"weight": torch.zeros(2)}, "not a teacher checkpoint"),  # a dict of some other model
        (torch.zeros(3), "not a teacher checkpoint"),  # not a dict at all
        ([1, 2], "not a teacher checkpoint"),
        (b"this is not a checkpoint", "not a readable"),
        (b"", "not a readable"),
    ],
)
def test_non_teacher_files_error_clearly(tmp_path, payload, match):
    path = tmp_path / "file.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(TeacherCheckpointError, match=match) as info:
        create_clip_teacher(MODEL, None, path, CLASSNAMES, "plain")
    assert "file.pt" in str(info.value)


def test_garbage_safetensors_file_errors_clearly(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(TeacherCheckpointError, match="w.safetensors"):
        create_clip_teacher(MODEL, None, path, CLASSNAMES, "plain")


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_clip_teacher(MODEL, None, tmp_path / "missing.pt", CLASSNAMES, "plain")


def test_open_clip_full_weights_load_and_rebuild_the_head(classifier, tmp_path):
    source = _open_clip_model(seed=7)
    path = tmp_path / "open_clip.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    loaded = create_clip_teacher(MODEL, None, path, CLASSNAMES, "plain")
    _assert_same_weights(loaded.model.visual, source.visual)
    with torch.no_grad():
        head = _zero_shot_head(source)
        torch.testing.assert_close(loaded.model.head, head.t(), rtol=0, atol=1e-6)
        features = source.encode_image(loaded.model.normalize_input(_images()), normalize=True)
        torch.testing.assert_close(loaded(_images()), source.logit_scale.exp() * features @ head, rtol=1e-5, atol=1e-5)


def test_open_clip_weights_that_do_not_fit_are_refused(classifier, tmp_path):
    state = _open_clip_model(seed=7).state_dict()
    dropped = next(k for k in state if k.startswith("visual."))
    state.pop(dropped)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(TeacherCheckpointError, match=re.escape(dropped)):
        create_clip_teacher(MODEL, None, tmp_path / "partial.pt", CLASSNAMES, "plain")


def test_timm_teacher_from_a_local_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    source = timm.create_model("test_vit", pretrained=False).eval()
    with torch.no_grad():
        for p in source.parameters():  # non-default weights, so a silent re-init would show
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "test_vit.pth"
    torch.save(source.state_dict(), path)
    teacher = create_clip_teacher(checkpoint=f"timm:test_vit={path}")
    assert isinstance(teacher, FrozenTeacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    _assert_same_weights(teacher.model.model, source)
    size = source.pretrained_cfg["input_size"][-1]
    images = _images(2, size)
    with torch.no_grad():
        expected = source((images - 0.5) / 0.5)  # test_vit's pretrained_cfg mean/std are 0.5
        torch.testing.assert_close(teacher(images), expected, rtol=1e-5, atol=1e-5)
        assert teacher(_images(2, 32)).shape == (2, source.num_classes)  # resized to the model's input


def test_templates():
    assert len(get_templates("openai")) == 80
    assert len(get_templates("simple")) == 7
    (plain,) = get_templates("plain")
    assert plain("cat") == "a photo of a cat."
    with pytest.raises(ValueError, match="fancy"):
        get_templates("fancy")

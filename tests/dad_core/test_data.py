"""Datasets take labels from an explicit class list, never from folder sort order; bad images are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dad_core.data import (
    BadImageError,
    ClassList,
    ImageFolderDataset,
    SyntheticImageDataset,
    create_eval_transform,
    create_train_transform,
    load_image,
    read_classes,
    scan_image_folder,
    verify_images,
    write_classes,
)


def _png(path, value: int = 128, size: tuple[int, int] = (8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def _numbered_tree(root, n: int = 12):
    """Folders "0".."n-1" as the reference's DAD generator writes them; pixel value encodes the class."""
    for label in range(n):
        _png(root / str(label) / f"img_{label}.png", value=10 * label)
    return ClassList(tuple(str(i) for i in range(n)), tuple(f"class {i}" for i in range(n)))


def test_numeric_folder_names_map_by_the_class_list_not_lexicographically(tmp_path):
    classes = _numbered_tree(tmp_path)
    samples = scan_image_folder(tmp_path, classes)
    assert len(samples) == 12
    assert dict(samples)["10/img_10.png"] == 10  # ImageFolder's string sort would give 2
    assert all(rel.split("/")[0] == str(label) for rel, label in samples)
    # The label travels with the image the generator wrote for it.
    dataset = ImageFolderDataset(tmp_path, samples, transform=lambda img: int(np.asarray(img)[0, 0, 0]))
    assert all(pixel == 10 * label for pixel, label in dataset)
    assert dataset.targets == sorted(dataset.targets) == list(range(12))


def test_class_list_order_defines_the_index(tmp_path):
    for wnid in ("n02", "n01", "n03"):
        _png(tmp_path / wnid / "a.png")
    classes = ClassList(("n03", "n01", "n02"), ("c", "a", "b"))
    assert {rel.split("/")[0]: label for rel, label in scan_image_folder(tmp_path, classes)} == {
        "n03": 0,
        "n01": 1,
        "n02": 2,
    }


def test_integer_folders_map_by_value(tmp_path):
    # ImageNet-V2 names its folders 0..999 by class index, whatever the class ids are.
    classes = ClassList(tuple(f"n{i:08d}" for i in range(12)), tuple(f"c{i}" for i in range(12)))
    for label in (0, 2, 10, 11):
        _png(tmp_path / str(label) / "x.png")
    samples = scan_image_folder(tmp_path, classes, integer_folders=True)
    assert samples == [("0/x.png", 0), ("2/x.png", 2), ("10/x.png", 10), ("11/x.png", 11)]
    dataset = ImageFolderDataset.from_folder(tmp_path, classes, integer_folders=True)
    assert dataset.targets == [0, 2, 10, 11]


def test_integer_folder_out_of_range_errors(tmp_path):
    _png(tmp_path / "12" / "x.png")
    classes = ClassList(tuple(str(i) for i in range(12)), tuple(str(i) for i in range(12)))
    with pytest.raises(ValueError, match="12"):
        scan_image_folder(tmp_path, classes, integer_folders=True)


def test_folder_not_in_the_class_list_is_named(tmp_path):
    _png(tmp_path / "n01" / "a.png")
    _png(tmp_path / "stray_folder" / "a.png")
    with pytest.raises(ValueError, match="stray_folder"):
        scan_image_folder(tmp_path, ClassList(("n01",), ("one",)))


def test_missing_classes_allowed_or_named(tmp_path):
    _png(tmp_path / "a" / "1.png")
    classes = ClassList(("a", "b"), ("a", "b"))
    assert scan_image_folder(tmp_path, classes) == [("a/1.png", 0)]
    with pytest.raises(ValueError, match="'b'"):
        scan_image_folder(tmp_path, classes, allow_missing=False)


def test_non_image_files_are_ignored_and_missing_root_errors(tmp_path):
    _png(tmp_path / "a" / "1.png")
    (tmp_path / "a" / "notes.txt").write_text("x")
    assert scan_image_folder(tmp_path, ClassList(("a",), ("a",))) == [("a/1.png", 0)]
    with pytest.raises(FileNotFoundError):
        scan_image_folder(tmp_path / "nope", ClassList(("a",), ("a",)))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_png_raises_bad_image_error_naming_the_file(tmp_path):
    bad = _truncate(_png(tmp_path / "a" / "broken.png", size=(64, 64)))
    with pytest.raises(BadImageError, match="broken.png"):
        load_image(bad)
    (tmp_path / "a" / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="garbage.png"):
        load_image(tmp_path / "a" / "garbage.png")


def test_verify_images_errors_or_skips(tmp_path):
    _png(tmp_path / "a" / "good.png")
    _truncate(_png(tmp_path / "a" / "broken.png", size=(64, 64)))
    samples = scan_image_folder(tmp_path, ClassList(("a",), ("a",)))
    with pytest.raises(BadImageError, match="broken.png"):
        verify_images(tmp_path, samples, "error")
    good, bad = verify_images(tmp_path, samples, "skip")
    assert good == [("a/good.png", 0)]
    assert bad == ["a/broken.png"]
    dataset = ImageFolderDataset.from_folder(tmp_path, ClassList(("a",), ("a",)), on_bad_image="skip")
    assert dataset.samples == [("a/good.png", 0)]
    with pytest.raises(ValueError, match="ignore"):
        verify_images(tmp_path, samples, "ignore")


def test_load_image_converts_to_rgb(tmp_path):
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    img = load_image(tmp_path / "gray.png")
    assert img.mode == "RGB"
    assert img.size == (7, 5)


def test_read_write_classes_round_trip(tmp_path):
    classes = ClassList(("n01440764", "n01443537", "7"), ("tench", "goldfish, Carassius auratus", "7"))
    path = write_classes(classes, tmp_path / "classes.txt")
    assert read_classes(path) == classes
    assert path.read_text().splitlines() == ["n01440764\ttench", "n01443537\tgoldfish, Carassius auratus", "7"]


def test_read_classes_without_names_and_blank_lines(tmp_path):
    (tmp_path / "c.txt").write_text("b\n\na\n")
    assert read_classes(tmp_path / "c.txt") == ClassList(("b", "a"), ("b", "a"))
    with pytest.raises(FileNotFoundError):
        read_classes(tmp_path / "missing.txt")


def test_class_list_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate"):
        ClassList(("a", "a"), ("x", "y"))


def test_synthetic_dataset_is_deterministic_per_seed():
    a, b = SyntheticImageDataset(16, 4, 8, seed=3), SyntheticImageDataset(16, 4, 8, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    c = SyntheticImageDataset(16, 4, 8, seed=3)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.images, c.images)
    assert a.targets == c.targets
    d = SyntheticImageDataset(16, 4, 8, seed=4)
    assert not torch.equal(a.images, d.images)
    image, label = a[5]
    assert image.shape == (3, 8, 8)
    assert 0 <= label < 4
    assert isinstance(label, int)
    assert 0.0 <= a.images.min()
    assert a.images.max() <= 1.0
    assert len(a) == 16


@pytest.mark.parametrize("size", [(40, 30), (30, 40)])
def test_eval_transform_gives_unit_range_tensors_of_the_right_size(size):
    img = Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8))
    out = create_eval_transform(24, crop_pct=0.875)(img)
    assert out.shape == (3, 24, 24)
    assert out.dtype == torch.float32
    assert 0.0 <= out.min()
    assert out.max() <= 1.0
    # No normalization: a constant white image stays 1.0.
    white = create_eval_transform(24)(Image.new("RGB", size, (255, 255, 255)))
    assert torch.allclose(white, torch.ones_like(white))


def test_train_transform_gives_unit_range_tensors_of_the_right_size():
    img = Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8))
    transform = create_train_transform(16, randaugment="rand-m9-mstd0.5", reprob=1.0, scale=(0.5, 1.0))
    for _ in range(5):
        out = transform(img)
        assert out.shape == (3, 16, 16)
        assert out.dtype == torch.float32
        assert 0.0 <= out.min()
        assert out.max() <= 1.0

"""prepare-data: the digits dataset and its suites, ImageNet-style folders, DVC revisions, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dad_core.config import DataConfig
from dad_core.corruptions import CORRUPTION_NAMES, RENDITION_NAMES, apply_rendition
from dad_core.data import BadImageError, read_classes
from dad_core.prepare import DatasetError, prepare_digits, prepare_dvc, prepare_folder, verify_dataset

PER_CLASS = 2  # held-out images per class in the generated suites: keeps the module fast
CFG = DataConfig(suite_per_class=PER_CLASS)


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("digits") / "data"
    return root, prepare_digits(root, CFG, progress=False)


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_prepare_digits_twice_gives_identical_bytes(digits_root, tmp_path):
    root, report = digits_root
    again = prepare_digits(tmp_path / "again", CFG, progress=False)
    assert again["dataset_hash"] == report["dataset_hash"]
    first, second = _tree(root), _tree(tmp_path / "again")
    assert first == second  # every file, manifest.json included
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(first) - set(manifest["files"]) == {"manifest.json", "classes.txt"}
    assert verify_dataset(root)["dataset_hash"] == report["dataset_hash"]


def test_verify_dataset_names_a_changed_file(digits_root, tmp_path):
    root = shutil.copytree(digits_root[0], tmp_path / "copy")
    victim = root / "train" / "7" / sorted(os.listdir(root / "train" / "7"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=f"train/7/{victim.name}"):
        verify_dataset(root)


def test_labels_come_from_sklearn_and_the_class_list(digits_root, sklearn_digits):
    root, _ = digits_root
    classes = read_classes(root / "classes.txt")
    assert classes.ids == tuple(str(i) for i in range(10))
    assert classes.names[:3] == ("zero", "one", "two")
    assert classes.names[9] == "nine"
    for split in ("train", "val"):
        for path in (root / split).rglob("*.png"):
            assert int(path.parent.name) == sklearn_digits.target[int(path.stem)], path
    sample = sorted((root / "train" / "7").glob("*.png"))[0]
    gray = np.rint(sklearn_digits.images[int(sample.stem)] * 255 / 16).astype(np.uint8)
    expected = np.asarray(Image.fromarray(gray).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB"))
    assert sklearn_digits.target[int(sample.stem)] == 7
    assert np.array_equal(_pixels(sample), expected)


def test_split_is_stratified_disjoint_and_complete(digits_root, sklearn_digits):
    root, report = digits_root
    index = {split: [int(p.stem) for p in (root / split).rglob("*.png")] for split in ("train", "val")}
    assert report["counts"] == {"train": 1347, "val": 450}
    assert len(index["train"]) + len(index["val"]) == 1797
    assert sorted(index["train"] + index["val"]) == list(range(1797))
    per_class = Counter(sklearn_digits.target.tolist())
    val_per_class = Counter(sklearn_digits.target[index["val"]].tolist())
    for label, total in per_class.items():
        assert abs(val_per_class[label] - total * CFG.val_fraction) <= 1


def test_suite_descriptions_and_layout(digits_root):
    root, report = digits_root
    suites = root / "suites"
    expected = {
        "digits-val": ("clean", "class-folders"),
        "digits-c": ("corruption", "corruption/severity/class-folders"),
        "digits-r": ("rendition", "class-folders"),
    }
    for name, (kind, layout) in expected.items():
        spec = json.loads((suites / name / "suite.json").read_text())
        assert (spec["name"], spec["kind"], spec["layout"], spec["classes"]) == (name, kind, layout, "classes.txt")
        assert (suites / name / "classes.txt").read_bytes() == (root / "classes.txt").read_bytes()
    assert report["suites"] == {"digits-val": 450, "digits-c": 15 * 5 * 10 * PER_CLASS, "digits-r": 10 * PER_CLASS}
    assert sorted(p.name for p in (suites / "digits-c").iterdir() if p.is_dir()) == sorted(CORRUPTION_NAMES)
    for corruption in CORRUPTION_NAMES:
        assert sorted(p.name for p in (suites / "digits-c" / corruption).iterdir()) == ["1", "2", "3", "4", "5"]
        files = sorted((suites / "digits-c" / corruption / "3").rglob("*.png"))
        assert len(files) == 10 * PER_CLASS
        assert {p.parent.name for p in files} == set("0123456789")
    clean_suite = {rel: sha for rel, sha in _tree(suites / "digits-val").items() if rel.endswith(".png")}
    assert clean_suite == _tree(root / "val")


def test_corrupted_suites_use_the_same_images_and_grow_with_severity(digits_root):
    root, _ = digits_root
    folder = root / "suites" / "digits-c"
    for corruption in CORRUPTION_NAMES:
        distance = []
        for severity in (1, 5):
            files = sorted((folder / corruption / str(severity)).rglob("*.png"))
            clean = [_pixels(root / "val" / p.parent.name / p.name) for p in files]
            distance.append(np.mean([np.abs(_pixels(p).astype(int) - c).mean() for p, c in zip(files, clean)]))
        if corruption != "elastic_transform":  # its published severities 1-2 are big affine warps (see the module)
            assert distance[1] > distance[0], corruption
        assert distance[1] > 0, corruption


def test_renditions_are_balanced_and_reproducible(digits_root):
    root, _ = digits_root
    spec = json.loads((root / "suites" / "digits-r" / "suite.json").read_text())
    assignment = spec["assignment"]
    assert spec["renditions"] == list(RENDITION_NAMES)
    assert sorted(assignment) == sorted(
        p.relative_to(root / "suites" / "digits-r").as_posix() for p in (root / "suites" / "digits-r").rglob("*.png")
    )
    counts = Counter(assignment.values())
    assert set(counts) == set(RENDITION_NAMES)
    assert max(counts.values()) - min(counts.values()) <= 1
    inverted = [rel for rel, style in assignment.items() if style == "invert"]
    for rel in inverted:
        assert np.array_equal(_pixels(root / "suites" / "digits-r" / rel), 255 - _pixels(root / "val" / rel))
    rel = next(rel for rel, style in assignment.items() if style == "edges")
    expected = apply_rendition(_pixels(root / "val" / rel), "edges", np.random.default_rng(0))
    assert np.array_equal(_pixels(root / "suites" / "digits-r" / rel), expected)  # edges draws no random numbers


# --- ImageNet-style folders ------------------------------------------------------------------------------


def _make_tree(root: Path, *, truncated: bool = True) -> Path:
    """train/{n01,n02}/ and val/{n01,n02}/ with 3 PNGs each; train/n02/broken.png is cut short."""
    for split in ("train", "val"):
        for k, wnid in enumerate(("n01", "n02")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((12, 12, 3), 40 * i + k, np.uint8)).save(folder / f"img{i}.png")
    if truncated:
        good = (root / "train" / "n01" / "img0.png").read_bytes()
        (root / "train" / "n02" / "broken.png").write_bytes(good[: len(good) // 2])
    return root


def test_prepare_folder_error_mode_names_the_bad_file(tmp_path):
    source = _make_tree(tmp_path / "src")
    with pytest.raises(BadImageError, match="broken.png"):
        prepare_folder(source, tmp_path / "out", DataConfig(), progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_folder_skip_mode_reports_and_references_the_files(tmp_path):
    source = _make_tree(tmp_path / "src")
    report = prepare_folder(source, tmp_path / "out", DataConfig(on_bad_image="skip"), progress=False)
    assert report["skipped"] == ["train/n02/broken.png"]
    assert report["counts"] == {"train": 6, "val": 6}
    manifest = verify_dataset(tmp_path / "out")
    assert manifest["root"] == str(source.resolve())
    assert manifest["skipped"] == ["train/n02/broken.png"]
    assert "train/n02/broken.png" not in manifest["files"]
    assert "val/n01/img2.png" in manifest["files"]
    assert read_classes(tmp_path / "out" / "classes.txt").ids == ("n01", "n02")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["classes.txt", "manifest.json"]  # no copies


def test_prepare_folder_uses_the_source_class_list_order_and_replaces_old_output(tmp_path):
    source = _make_tree(tmp_path / "src", truncated=False)
    (source / "classes.txt").write_text("n02\tsecond\nn01\tfirst\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    prepare_folder(source, out, DataConfig(), progress=False)
    classes = read_classes(out / "classes.txt")
    assert classes.ids == ("n02", "n01")
    assert classes.names == ("second", "first")
    assert not (out / "stale.txt").exists()


def test_prepare_folder_rejects_unknown_class_folders_and_missing_sources(tmp_path):
    source = _make_tree(tmp_path / "src", truncated=False)
    (source / "val" / "n99").mkdir()
    (source / "classes.txt").write_text("n01\nn02\n")
    with pytest.raises(DatasetError, match="n99"):
        prepare_folder(source, tmp_path / "out", DataConfig(), progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_folder(tmp_path / "nowhere", tmp_path / "out", DataConfig(), progress=False)


# --- DVC -------------------------------------------------------------------------------------------------


def _run(cwd: Path, *cmd: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "DVC_NO_ANALYTICS": "1",
    }
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_prepare_dvc_materializes_a_tagged_revision(tmp_path):
    repo = tmp_path / "repo"
    _make_tree(repo / "images", truncated=False)
    dvc = (sys.executable, "-m", "dvc")
    _run(repo, "git", "init", "-q")
    _run(repo, *dvc, "init", "-q")
    _run(repo, *dvc, "add", "-q", "images")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "v1")
    _run(repo, "git", "tag", "v1")
    shutil.copy(repo / "images" / "train" / "n01" / "img0.png", repo / "images" / "train" / "n01" / "extra.png")
    _run(repo, *dvc, "add", "-q", "images")
    _run(repo, "git", "commit", "-qam", "v2")

    report = prepare_dvc(str(repo), "v1", "images", tmp_path / "out", DataConfig(), progress=False)
    assert report["counts"] == {"train": 6, "val": 6}  # v1, without v2's extra image
    assert report["source"]["rev"] == "v1"
    assert len(report["source"]["commit"]) == 40
    manifest = verify_dataset(tmp_path / "out")
    assert manifest["root"] == "source"
    assert (tmp_path / "out" / "source" / "val" / "n02" / "img1.png").is_file()
    with pytest.raises(DatasetError, match="no-such-tag"):
        prepare_dvc(str(repo), "no-such-tag", "images", tmp_path / "bad", DataConfig(), progress=False)


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_prepares_digits_end_to_end(tmp_path, monkeypatch, capsys):
    from dad_core.cli.prepare_data import main

    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults
    out = tmp_path / "data" / "digits"
    assert main(["--source", "digits", "--output", str(out), "-p", "data.suite_per_class=1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "data" / "digits.report.json").read_text())
    assert report["dataset_hash"] == json.loads((out / "manifest.json").read_text())["dataset_hash"]
    assert report["suites"]["digits-r"] == 10
    assert report["config"]["suite_per_class"] == 1
    assert "prepared" in capsys.readouterr().out


def test_cli_prepares_a_folder_with_skips(tmp_path, monkeypatch):
    from dad_core.cli.prepare_data import main

    monkeypatch.chdir(tmp_path)
    source = _make_tree(tmp_path / "src")
    args = [
        "--source",
        "folder",
        "--source-dir",
        str(source),
        "--output",
        "out",
        "--report",
        "r.json",
        "-p",
        "data.on_bad_image=skip",
        "--no-progress",
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["skipped"] == ["train/n02/broken.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "data.val_fraction=2"], "data.val_fraction"),
        (["--source", "folder"], "data.source_dir"),
        (["--source", "dvc", "--dvc-path", "images"], "data.dvc_repo"),
        (["--source", "folder", "--source-dir", "missing"], "missing"),
    ],
)
def test_cli_bad_input_fails_with_a_clear_message(tmp_path, monkeypatch, capsys, args, message):
    from dad_core.cli.prepare_data import main

    monkeypatch.chdir(tmp_path)
    assert main([*args, "--output", str(tmp_path / "out"), "--no-progress"]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

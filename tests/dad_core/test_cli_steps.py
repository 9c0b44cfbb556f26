"""The ``dad`` entry point for the teacher steps: finetune-teacher and a two-worker cache-teacher run end to end,
and the one-line exit-2 errors for bad input (STYLE rule 40; DESIGN 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _folders import write_numbered_folders
from PIL import Image

from dad_core.cli.main import main
from dad_core.config import load_config
from dad_core.data import open_split, read_classes
from dad_core.io import sha256_file
from dad_core.prepare import prepare_folder
from dad_core.teacher import create_clip_teacher
from dad_core.teacher_cache import load_teacher_cache

NUM_CLASSES = 12


def _make_source(root: Path) -> Path:
    """``train/<k>/`` and ``val/<k>/`` for k in 0..11 (numbered folders), noise with a class-coded corner."""
    return write_numbered_folders(root, NUM_CLASSES, train_per_class=6, block=8, class_names=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prepared 12-class folder dataset, a random tiny-f4 VQGAN checkpoint, and the fine-tune CLI's output."""
    from dad_core.vqgan import VQGAN

    base = tmp_path_factory.mktemp("cli")
    source = _make_source(base / "src")
    prepare_folder(source, base / "data", load_config(None, []).data, progress=False)
    torch.manual_seed(0)
    vqgan = VQGAN.from_config("tiny-f4").save_checkpoint(base / "vqgan.pt")  # random weights: plumbing only
    teacher = base / "models" / "teacher.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)  # the repository's params.yaml must not leak in: built-in defaults
        code = main(
            [
                "finetune-teacher",
                "--data-root",
                str(base / "data"),
                "--output",
                str(teacher),
                "-p",
                "finetune.epochs=1",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
    return {
        "base": base,
        "source": source,
        "data": base / "data",
        "vqgan": Path(vqgan),
        "teacher": teacher,
        "finetune_code": code,
    }


@pytest.fixture(autouse=True)
def _no_params_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_finetune_teacher_writes_a_checkpoint_and_a_report(workspace):
    assert workspace["finetune_code"] == 0
    teacher = workspace["teacher"]
    report = json.loads(teacher.with_name("teacher.safetensors.report.json").read_text())
    assert report["epochs"] == 1 and report["steps"] == 72 // 64  # drop_last: one step per full batch of 64
    assert report["output"] == str(teacher) and report["sha256"] == sha256_file(teacher)
    assert 0 <= report["zero_shot_top1"] <= 100 and 0 <= report["top1"] <= 100
    names = read_classes(workspace["data"] / "classes.txt").names
    model = create_clip_teacher(checkpoint=teacher, classnames=list(names))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_cache_teacher_with_two_workers_leaves_a_complete_cache(workspace, tmp_path, capsys):
    out = tmp_path / "cache"
    common = [
        "cache-teacher",
        "--data-root",
        str(workspace["data"]),
        "--output",
        str(out),
        "--teacher-checkpoint",
        str(workspace["teacher"]),
        "--vqgan-checkpoint",
        str(workspace["vqgan"]),
        "-p",
        "cache.shard_size=30",
        "--num-shards",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*common, "--shard-index", "0"]) == 0
    assert "waiting for other workers" in capsys.readouterr().out
    assert not (out / "manifest.json").exists()
    assert main([*common, "--shard-index", "1"]) == 0
    assert "complete" in capsys.readouterr().out
    reports = [json.loads((out / f"report-{i}.json").read_text()) for i in (0, 1)]
    assert reports[0]["shards_written"] == [0, 2] and reports[1]["shards_written"] == [1]
    assert not reports[0]["complete"] and reports[1]["complete"]
    cache = load_teacher_cache(out, num_classes=NUM_CLASSES)  # every checksum verified
    assert len(cache) == 72 and cache.manifest["num_shards"] == 3
    assert cache.labels().tolist() == open_split(workspace["data"], "train").targets
    assert cache.manifest["teacher"]["checkpoint_sha256"] == sha256_file(workspace["teacher"])
    assert cache.manifest["vqgan"]["checkpoint_sha256"] == sha256_file(workspace["vqgan"])
    with Image.open(out / "samples.png") as grid:
        grid.load()
        assert grid.mode == "RGB" and grid.size[0] > grid.size[1] > 32


def test_cache_teacher_without_a_vqgan_checkpoint_exits_2_before_loading_the_teacher(
    workspace, tmp_path, capsys, monkeypatch
):
    import dad_core.teacher

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was built before the configuration was checked")

    monkeypatch.setattr(dad_core.teacher, "create_clip_teacher", no_teacher)
    out = tmp_path / "cache"
    assert (
        main(
            [
                "cache-teacher",
                "--data-root",
                str(workspace["data"]),
                "--output",
                str(out),
                "--no-progress",
                "-p",
                "attack.mode=dad",
            ]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "vqgan.checkpoint" in errors[0]
    assert not out.exists()


def test_cache_teacher_names_a_truncated_image(workspace, tmp_path, capsys):
    source = shutil.copytree(workspace["source"], tmp_path / "src")
    prepare_folder(source, tmp_path / "data", load_config(None, []).data, progress=False)
    bad = source / "train" / "3" / "img04.png"
    bad.write_bytes(bad.read_bytes()[:50])  # damaged after prepare-data checked it
    assert (
        main(
            [
                "cache-teacher",
                "--data-root",
                str(tmp_path / "data"),
                "--output",
                str(tmp_path / "cache"),
                "--vqgan-checkpoint",
                str(workspace["vqgan"]),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0]


def test_unknown_step_exits_2_and_help_exits_0(capsys):
    assert main(["nope"]) == 2
    assert "unknown step 'nope'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "finetune-teacher" in usage and "cache-teacher" in usage
    for step in ("finetune-teacher", "cache-teacher"):
        with pytest.raises(SystemExit) as exit_:
            main([step, "--help"])
        assert exit_.value.code == 0
        assert f"dad {step}" in capsys.readouterr().out


@pytest.mark.parametrize("step", ["finetune-teacher", "cache-teacher"])
def test_an_unknown_config_key_exits_2_naming_it(step, tmp_path, capsys):
    assert main([step, "--data-root", str(tmp_path), "--output", str(tmp_path / "out"), "-p", "foo.bar=1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "foo" in errors[0]
    assert not (tmp_path / "out").exists()

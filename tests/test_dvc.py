"""``dvc.yaml`` for real, in a throw-away git + DVC repository: repro, push/pull (folder and S3), old revisions.

The repository gets copies of ``dvc.yaml``, ``params.yaml`` and ``dad_core/`` (the stages depend on its modules);
the stages run the installed interpreter. Only the cheap ``prepare`` stage runs (seconds), so the data commands
name it as their target.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "finetune_teacher", "train_vqgan", "cache_teacher", "train", "evaluate")
MANIFEST = "data/digits/manifest.json"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # `python` and `dvc` of this environment
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "HF_HUB_OFFLINE": "1",
        **(extra or {}),
    }


def _sh(cwd: Path, *cmd: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _dvc(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return _sh(cwd, sys.executable, "-m", "dvc", *args, env=env)


def _set_params(repo: Path, **values) -> None:
    """Edit ``params.yaml`` of the test repository: ``_set_params(repo, data={"seed": 1})``."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, keys in values.items():
        params[section].update(keys)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC repository whose ``prepare`` stage ran and was committed as tag ``v1``."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "dad_core", repo / "dad_core", ignore=shutil.ignore_patterns("__pycache__"))
    _set_params(repo, data={"suite_per_class": 1})  # small shifted suites: the stage takes seconds
    _sh(repo, "git", "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    _dvc(repo, "repro", "prepare")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-q", "-m", "v1")
    _sh(repo, "git", "tag", "v1")
    return repo


def test_dvc_yaml_declares_every_stage_and_its_lineage():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert tuple(spec["stages"]) == STAGES
    for name, stage in spec["stages"].items():
        module = stage["cmd"].split()[2]
        assert stage["cmd"].startswith("python -m dad_core.cli."), name  # the CLI the component runs too
        assert f"{module.replace('.', '/')}.py" in stage["deps"], name
        assert any(dep.startswith("dad_core/") and "/cli/" not in dep for dep in stage["deps"]), name
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                assert part in node, f"{name}: params.yaml has no key {key}"
                node = node[part]
    metrics = [path for stage in spec["stages"].values() for item in stage.get("metrics", []) for path in item]
    assert metrics == ["runs/eval/metrics.json"]  # small flat files only: the full report is an ordinary output
    assert spec["metrics"] == ["runs/train/metrics.json"]  # inside the train stage's output folder
    plots = [path for item in spec["stages"]["evaluate"]["plots"] for path in item]
    assert plots == ["runs/eval/accuracy.png", "runs/eval/suite_top1.json"]
    assert spec["plots"] == [{"runs/train/train_curve.json": {"x": "epoch", "y": "loss", "title": ANY}}]


def test_repro_prepare_records_params_and_is_up_to_date(dvc_repo):
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock["params"]["params.yaml"]["data.suite_per_class"] == 1
    assert {dep["path"] for dep in lock["deps"]} >= {"dad_core/prepare.py", "dad_core/cli/prepare_data.py"}
    manifest = json.loads((dvc_repo / MANIFEST).read_text())
    assert manifest["dataset_hash"] and (dvc_repo / "data" / "digits" / "classes.txt").is_file()
    assert "up to date" in _dvc(dvc_repo, "status", "prepare").lower()


def test_push_and_pull_with_a_folder_remote(dvc_repo, tmp_path):
    clone = tmp_path / "clone"
    _sh(tmp_path, "git", "clone", "-q", str(dvc_repo), str(clone))
    _dvc(dvc_repo, "remote", "add", "--local", "folder", str(tmp_path / "remote"))
    _dvc(dvc_repo, "push", "-r", "folder", "prepare")
    assert not (clone / MANIFEST).exists()
    _dvc(clone, "remote", "add", "--local", "folder", str(tmp_path / "remote"))
    _dvc(clone, "pull", "-r", "folder", "prepare")
    assert (clone / MANIFEST).read_bytes() == (dvc_repo / MANIFEST).read_bytes()
    assert "up to date" in _dvc(clone, "status", "prepare").lower()


def test_s3_remote_and_an_older_revision(dvc_repo, seaweedfs, tmp_path, monkeypatch):
    """Push to SeaweedFS, drop every local copy and pull; commit v2; then read a file of v1 back from S3."""
    import dvc.api

    bucket, credentials = seaweedfs.create_bucket("dvc-store"), seaweedfs.env()
    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo, repo, symlinks=True)  # workspace, cache and history; the module's repo stays as is
    _dvc(repo, "remote", "add", "-d", "s3", f"s3://{bucket}/store")
    _dvc(repo, "remote", "modify", "s3", "endpointurl", seaweedfs.endpoint)
    _sh(repo, "git", "commit", "-q", "-am", "S3 remote")
    _sh(repo, "git", "tag", "-f", "v1")  # old revisions are read with the remote they name, so v1 names it
    v1 = (repo / MANIFEST).read_text()
    _dvc(repo, "push", "prepare", env=credentials)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "digits")
    _dvc(repo, "pull", "prepare", env=credentials)
    assert (repo / MANIFEST).read_text() == v1

    v2 = json.dumps({**json.loads(v1), "note": "v2"}, indent=2)  # a new version of the data, recorded as usual
    (repo / MANIFEST).write_text(v2)
    _dvc(repo, "commit", "-f", "prepare")
    _sh(repo, "git", "commit", "-q", "-am", "v2")
    shutil.rmtree(repo / ".dvc" / "cache")  # from here on, v1 can only come from S3

    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    assert dvc.api.read(MANIFEST, repo=str(repo), rev="v1") == v1
    assert dvc.api.read(MANIFEST, repo=str(repo)) == v2


def test_prepare_data_from_a_dvc_tag(dvc_repo, tmp_path):
    """``dad prepare-data --source dvc``: the dataset at tag v1 of the repository, validated and re-prepared."""
    from dad_core.cli import prepare_data

    out = tmp_path / "from-dvc"
    argv = [
        "--source",
        "dvc",
        "--dvc-repo",
        str(dvc_repo),
        "--dvc-rev",
        "v1",
        "--dvc-path",
        "data/digits",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert prepare_data.main(argv) == 0
    report = json.loads((tmp_path / "from-dvc.report.json").read_text())
    tagged = json.loads((dvc_repo / MANIFEST).read_text())
    assert report["source"]["kind"] == "dvc" and report["source"]["rev"] == "v1"
    assert report["counts"]["train"] == tagged["splits"]["train"]["count"]
    assert (out / "classes.txt").read_text() == (dvc_repo / "data" / "digits" / "classes.txt").read_text()


def _image_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]


def test_a_dvc_revision_is_checked_out_once_on_the_datasets_volume_and_read_in_place(dvc_repo, tmp_path):
    """With ``data.dvc_checkouts``: one checkout per commit, reused; the prepared dataset holds no image."""
    from dad_core.cli import prepare_data
    from dad_core.data import open_split

    volume = tmp_path / "datasets"

    def prepare(name: str) -> dict:
        argv = ["--source", "dvc", "--dvc-repo", str(dvc_repo), "--dvc-rev", "v1", "--dvc-path", "data/digits"]
        argv += ["--output", str(tmp_path / name), "--no-progress", "-p", f"data.dvc_checkouts={volume}"]
        assert prepare_data.main(argv) == 0
        return json.loads((tmp_path / f"{name}.report.json").read_text())

    first = prepare("first")
    checkout = Path(first["source"]["checkout"])
    assert first["source"]["reused"] is False and checkout.is_relative_to(volume)
    assert checkout.name == "digits" and checkout.parents[1].name == first["source"]["commit"]
    images = _image_files(checkout)
    assert images and not _image_files(tmp_path / "first")  # the images stay on the volume
    assert json.loads((tmp_path / "first" / "manifest.json").read_text())["root"] == str(checkout)
    written = {p: p.stat().st_mtime_ns for p in images}

    second = prepare("second")  # the same revision: nothing is downloaded or copied again
    assert second["source"]["reused"] is True and second["source"]["checkout"] == str(checkout)
    assert second["dataset_hash"] == first["dataset_hash"]
    assert {p: p.stat().st_mtime_ns for p in _image_files(checkout)} == written
    assert not _image_files(tmp_path / "second") and not list(volume.rglob(".*partial*"))
    split = open_split(tmp_path / "second", "train")  # read where they are
    assert len(split) == first["counts"]["train"] and split.root == checkout / "train"
    assert (split.root / split.samples[0][0]).is_file()


def _tree(root: Path) -> Path:
    """What a fresh clone of this working tree holds: tracked and untracked, not ignored, files, as one commit."""
    listed = _sh(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    for name in listed:
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is not there
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    _sh(root, "git", "init", "-q", "-b", "main")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "commit", "-q", "-m", "fresh clone")
    return root


@pytest.mark.slow
def test_a_fresh_clone_is_a_dvc_repository_with_flat_metrics_and_plots(tmp_path):
    """``.dvc/`` is committed: a clone runs ``dvc dag``, ``dvc metrics show`` and ``dvc plots show`` as it is."""
    repo = _tree(tmp_path / "clone")
    assert (repo / ".dvc" / "config").is_file() and not (repo / ".dvc" / "cache").exists()
    dag = _dvc(repo, "dag", "--md")
    assert all(stage in dag for stage in STAGES)
    # the default remote, ../.dvc-store relative to .dvc/: a folder of the clone itself, wherever it lives
    assert _dvc(repo, "remote", "list").split() == ["local", str(repo / ".dvc-store"), "(default)"]

    # What `dvc repro` leaves, in miniature: the train and evaluate CLIs' flat metrics and plot data.
    scores = {"clean_top1": 90.0, "ood_mean_top1": 60.0, "digits-c_top1": 55.0, "digits-r_top1": 65.0}
    _write(repo / "runs/eval/metrics.json", scores)
    _write(
        repo / "runs/eval/suite_top1.json", [{"suite": "digits-c", "top1": 55.0}, {"suite": "digits-r", "top1": 65.0}]
    )
    _write(repo / "runs/train/metrics.json", {"val_top1": 80.5, "images_per_s": 900.0, "steps": 40, "loss": 0.7})
    _write(repo / "runs/train/train_curve.json", [{"epoch": 1, "loss": 1.2, "lr": 0.002}, {"epoch": 2, "loss": 0.7}])

    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    (workspace,) = shown.values()
    files = workspace["data"]
    assert files["runs/eval/metrics.json"]["data"] == scores
    assert files["runs/train/metrics.json"]["data"]["val_top1"] == 80.5
    table = _dvc(repo, "metrics", "show")
    assert "val_top1" in table and "ood_mean_top1" in table and len(table.splitlines()) == 3  # header, two files

    plots = json.loads(_dvc(repo, "plots", "show", "--json"))["data"]
    assert {"runs/train/train_curve.json", "runs/eval/suite_top1.json"} <= set(plots)


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))

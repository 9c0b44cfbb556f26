"""``--local --runner docker`` without a Docker engine: its arguments, its errors, its services and its step runner.

The run itself, in containers of the built image, is ``tests/container`` (``make test-container``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import local_docker
from pipelines.dad_pipeline import WORK_MOUNT, UsageError, _docker_paths, _docker_tracking_uri

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "pipelines/dad_pipeline.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_local_checkpoints_under_the_workdir_are_seen_under_its_mount(tmp_path):
    given = {"teacher_checkpoint": str(tmp_path / "models" / "t.safetensors"), "vqgan_checkpoint": "s3://b/v.ckpt"}
    arguments = _docker_paths(given, tmp_path)
    assert arguments["workdir"] == WORK_MOUNT
    assert arguments["teacher_checkpoint"] == f"{WORK_MOUNT}/models/t.safetensors"
    assert arguments["vqgan_checkpoint"] == "s3://b/v.ckpt"  # a URI: the step reads it itself


def test_a_local_checkpoint_outside_the_workdir_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"teacher_checkpoint under the workdir"):
        _docker_paths({"teacher_checkpoint": "/elsewhere/t.safetensors"}, tmp_path)


def test_the_containers_need_an_mlflow_server_not_a_file(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _docker_tracking_uri({}) is None  # one is started for the run
    assert _docker_tracking_uri({"mlflow_tracking_uri": "http://mlflow:5000"}) == "http://mlflow:5000"
    with pytest.raises(UsageError, match=r"need an MLflow server, not 'sqlite:///x.db'"):
        _docker_tracking_uri({"mlflow_tracking_uri": "sqlite:///x.db"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    assert _docker_tracking_uri({}) == "https://mlflow.example.com"


def test_runner_is_an_option_of_local():
    result = _run("--compile", "--runner", "docker")
    assert result.returncode == 2 and "--runner is an option of --local" in result.stderr


def test_without_a_docker_engine_the_run_stops_at_once_and_says_so(tmp_path):
    sock = tmp_path / "none.sock"
    result = _run("--local", "--runner", "docker", "--output-dir", str(tmp_path), env={"DOCKER_HOST": f"unix://{sock}"})
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --runner docker: no Docker engine answers at unix://{sock}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "services").exists()  # nothing was started


def test_the_step_runner_runs_like_the_pod(tmp_path, monkeypatch):
    """uid 10001, read-only root, tmpfs /tmp, host network, the two volumes, credentials passed through."""
    monkeypatch.setattr(local_docker, "_client", lambda: type("C", (), {"close": lambda self: None})())
    monkeypatch.setattr(local_docker, "_check_image", lambda client, image: None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    runner = local_docker.docker_runner("img:1", tmp_path / "work", tmp_path / "data")
    args = runner.container_run_args
    assert args["user"] == "10001:10001" and args["read_only"] is True and args["network_mode"] == "host"
    assert args["tmpfs"]["/tmp"].startswith("rw,") and "mode=1777" in args["tmpfs"]["/tmp"]
    mounts = {m["Target"]: (m["Source"], m["Type"]) for m in args["mounts"]}
    assert mounts == {
        "/mnt/dad-work": (str(tmp_path / "work"), "bind"),
        "/mnt/datasets": (str(tmp_path / "data"), "bind"),
    }
    assert args["environment"]["AWS_ACCESS_KEY_ID"] == "key-id"
    assert "MLFLOW_TRACKING_PASSWORD" not in args["environment"]
    assert args["environment"]["HF_HUB_OFFLINE"] == "1"


def test_shared_folders_are_writable_by_the_steps_user(tmp_path):
    folder = local_docker.shared_folder(tmp_path / "a" / "b")
    assert folder.stat().st_mode & 0o777 == 0o777


@pytest.mark.integration
def test_the_run_services_store_artifacts_in_s3_behind_the_mlflow_server(tmp_path):
    """What a docker run gets when no MLflow server is given: the steps need no S3 credentials."""
    import mlflow

    with local_docker.run_services(tmp_path) as uri:
        client = mlflow.MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment("e"))
        (tmp_path / "a.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert Path(client.download_artifacts(run.info.run_id, "a.txt", str(tmp_path / "back"))).read_text() == "hello"
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()  # the store stays after the run
    assert any((tmp_path / "seaweedfs" / "data").rglob("*"))

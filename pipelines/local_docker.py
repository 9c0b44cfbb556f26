"""``--local --runner docker``: every step of a local run in the project image, the way a cluster runs it.

Each step is a container of the project image started by ``kfp.local.DockerRunner``, with what the pipeline's
``kfp.kubernetes`` settings give its pod in the cluster:

* the image's non-root user (uid/gid :data:`platform.RUN_AS_USER`), a read-only root file system and a tmpfs ``/tmp``;
* the shared workdir (the teacher-cache volume) at :data:`WORK_MOUNT` and the datasets volume at
  :data:`DATASETS_MOUNT`, both bind mounts of folders of the run (``<output-dir>/work``, ``<output-dir>/datasets``);
* the host network, so that the steps reach the MLflow server on a loopback port;
* of the credentials the cluster gives as Secrets, those set in this environment (S3, MLflow basic auth).

KFP mounts the pipeline root (the artifacts) at the same path in every container. The host creates the artifact
folders, so they are made group- and world-writable here (umask 0 while the run lasts): the steps write into them as
uid 10001.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines import platform

__all__ = [
    "DATASETS_MOUNT",
    "WORK_MOUNT",
    "DockerUnavailableError",
    "docker_runner",
    "open_umask",
    "run_services",
    "shared_folder",
]

WORK_MOUNT = platform.WORK_MOUNT  # where the steps see the shared workdir
DATASETS_MOUNT = platform.DATASETS_MOUNT  # where the steps see the datasets volume
# Environment every step container gets: nothing is downloaded at run time, no telemetry.
STEP_ENV = {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# The credentials the cluster mounts from Secrets, passed through from this environment when set.
PASSED_ENV = (*platform.S3_SECRET_KEYS, *platform.MLFLOW_SECRET_KEYS, "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")
TMP_SIZE = "8g"  # the tmpfs /tmp of each step (memory-backed; the steps keep only scratch files there)
SHM_SIZE = "2g"  # /dev/shm: the DataLoader workers pass batches through it (Docker's default is 64 MB)


class DockerUnavailableError(Exception):
    """No Docker engine answers, or the image is not in it; the message says what to do."""


def _client() -> Any:
    try:
        import docker
    except ImportError:
        raise DockerUnavailableError("the docker Python package is missing: make install") from None
    try:
        client = docker.from_env()
        client.ping()
    except Exception as err:  # noqa: BLE001 - any failure to reach the engine means the same to the user
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerUnavailableError(
            f"no Docker engine answers at {where} ({type(err).__name__}): start dockerd, or set DOCKER_HOST"
        ) from None
    return client


def _check_image(client: Any, image: str) -> None:
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise DockerUnavailableError(
            f"the image {image} is not in the Docker engine: build it (`make image`, or `docker build -t {image} .`) "
            "or pass the one you built with --image"
        ) from None


def shared_folder(path: Path) -> Path:
    """Create ``path`` (and its parents) writable by the steps' uid, which differs from this process's."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


@contextlib.contextmanager
def open_umask() -> Iterator[None]:
    """Umask 0 while the run lasts: KFP creates each step's artifact folders here, and the steps write into them."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def docker_runner(image: str, workdir: Path, datasets: Path, env: dict[str, str] | None = None) -> Any:
    """A ``kfp.local.DockerRunner`` that runs each step of ``image`` like its pod in the cluster.

    Args:
        image: the project image; it must be in the Docker engine already (nothing is pulled).
        workdir: the host folder mounted as the shared workdir, :data:`WORK_MOUNT`.
        datasets: the host folder mounted as the datasets volume, :data:`DATASETS_MOUNT`.
        env: more environment for every step (after :data:`STEP_ENV` and the passed-through credentials).

    Raises:
        DockerUnavailableError: no engine answers, or ``image`` is not in it.
    """
    import docker
    from kfp import local

    client = _client()
    try:
        _check_image(client, image)
    finally:
        client.close()
    mounts = [
        docker.types.Mount(WORK_MOUNT, str(workdir), type="bind"),
        docker.types.Mount(DATASETS_MOUNT, str(datasets), type="bind"),
    ]
    passed = {key: os.environ[key] for key in PASSED_ENV if os.environ.get(key)}
    uid = platform.RUN_AS_USER
    return local.DockerRunner(
        user=f"{uid}:{uid}",
        read_only=True,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={TMP_SIZE},mode=1777"},
        shm_size=SHM_SIZE,
        network_mode="host",
        mounts=mounts,
        environment={**STEP_ENV, **passed, **(env or {})},
    )


@contextlib.contextmanager
def run_services(folder: Path) -> Iterator[str]:
    """SeaweedFS and an ``mlflow server`` whose artifacts go to a bucket in it, for one run; yields the server's URI.

    Both keep their data in ``folder`` (``mlflow/mlflow.db``, ``seaweedfs/data``) after they stop. The steps talk to
    MLflow only: the server proxies the artifacts, so no step needs the object store's credentials.
    """
    from pipelines.local_services import start_mlflow_server, start_seaweedfs

    with start_seaweedfs(folder / "seaweedfs") as s3:
        bucket = s3.create_bucket(platform.MLFLOW_ARTIFACTS_BUCKET)
        with start_mlflow_server(folder / "mlflow", artifacts_destination=f"s3://{bucket}", env=s3.env()) as server:
            yield server.uri

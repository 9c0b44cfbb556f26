"""The training launcher: job bodies, the local torchrun backend, and the Kubernetes backend against kmock.

kmock's ``KubernetesEmulator`` is an in-memory API server: objects are really created, patched, listed and
deleted through the official ``kubernetes`` client. It has no controllers, so the tests play the Trainer
controller by patching ``status`` through the API, and it ignores label selectors (the launcher re-checks
labels itself). Pod logs are served by registering a reaction on the pod's ``/log`` URL.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dad_core.launch import (
    JobSpec,
    LaunchError,
    RetryPolicy,
    build_pytorchjob,
    build_trainjob,
    check_job_name,
    job_name,
    launch_training,
    run_kubernetes_job,
    run_local,
    validate_job_body,
)

KubernetesError = pytest.importorskip("kmock").KubernetesError  # an error reaction for the emulator

NS = "dad"
TRAINJOBS = ("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs")
PYTORCHJOBS = ("kubeflow.org", "v1", NS, "pytorchjobs")
FAST = {"poll_interval_s": 0.05, "retry": RetryPolicy(attempts=3, initial_delay_s=0.01)}
PROBE_DIR = Path(__file__).parent  # _launch_probe.py lives here; `python -m _launch_probe` needs it as the cwd


def full_spec(**overrides) -> JobSpec:
    fields = dict(
        name="dad-train-test",
        image="registry.example.com/dad:1.0",
        namespace=NS,
        train_args=("--config", "c.yaml"),
        num_nodes=2,
        nproc_per_node=4,
        gpus_per_node=4,
        cpu="16",
        memory="64Gi",
        env={"NCCL_DEBUG": "WARN"},
        secret_env={"AWS_SECRET_ACCESS_KEY": ("s3-credentials", "secret-key")},
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        pvc_mounts={"dad-data": "/data", "dad-outputs": "/outputs"},
        shm_size="8Gi",
        service_account="dad-runner",
        timeout_s=3600,
        labels={"app.kubernetes.io/part-of": "dad"},
    )
    return JobSpec(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------------ names


def test_job_name_is_deterministic_dns_safe_and_short():
    name = job_name("3f2a-run-id", "train-student")
    assert name == job_name("3f2a-run-id", "train-student")
    assert name != job_name("3f2a-run-id", "train-student-2") != job_name("other-run", "train-student")
    assert name.startswith("dad-train-")
    assert len(name) <= 63
    assert check_job_name(name) == name
    for bad in ("Dad-Train", "1-starts-with-digit", "ends-with-", "x" * 64, "under_score"):
        with pytest.raises(LaunchError, match="RFC 1035"):
            check_job_name(bad)
    with pytest.raises(LaunchError, match="run id"):
        job_name("")


def test_importing_launch_loads_neither_kubernetes_nor_kfp():
    code = "import sys, dad_core.launch; print(sorted({m.split('.')[0] for m in sys.modules} & {'kubernetes', 'kfp'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_job_spec_rejects_bad_values():
    with pytest.raises(LaunchError, match="num_nodes"):
        full_spec(num_nodes=0)
    with pytest.raises(LaunchError, match="PET_"):
        full_spec(env={"PET_NNODES": "2"})
    with pytest.raises(LaunchError, match="absolute"):
        full_spec(pvc_mounts={"dad-data": "data"})
    with pytest.raises(LaunchError, match="DNS-1123"):
        full_spec(pvc_mounts={"dad.data": "/data"})


# ------------------------------------------------------------------------------------------------ bodies


def test_trainjob_body_validates_and_puts_every_setting_in_its_place():
    body = build_trainjob(full_spec())
    validate_job_body(body)
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert body["kind"] == "TrainJob"
    spec = body["spec"]
    assert spec["runtimeRef"]["name"] == "dad-torch-distributed"
    assert spec["activeDeadlineSeconds"] == 3600
    trainer = spec["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "dad_core.cli.train", "--config", "c.yaml"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in trainer["env"]
    assert {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "secret-key"}},
    } in trainer["env"]
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["spec"]["serviceAccountName"] == "dad-runner"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "dad-data", "persistentVolumeClaim": {"claimName": "dad-data"}} in pod["spec"]["volumes"]
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "node"
    assert {"name": "dad-outputs", "mountPath": "/outputs"} in container["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_minimal_trainjob_has_no_empty_sections():
    body = build_trainjob(JobSpec(name="dad-train-min", image="img", pod_annotations={}))
    validate_job_body(body)
    assert "runtimePatches" not in body["spec"]
    assert "resourcesPerNode" not in body["spec"]["trainer"]
    assert "activeDeadlineSeconds" not in body["spec"]


def test_pytorchjob_body_validates_and_puts_every_setting_in_its_place():
    body = build_pytorchjob(full_spec(runtime="ignored"))
    validate_job_body(body)
    assert body["apiVersion"] == "kubeflow.org/v1"
    assert body["kind"] == "PyTorchJob"
    spec = body["spec"]
    assert spec["nprocPerNode"] == "4"
    assert spec["runPolicy"] == {"cleanPodPolicy": "None", "backoffLimit": 0, "activeDeadlineSeconds": 3600}
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    pod = replicas["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    assert container["command"][:3] == ["torchrun", "-m", "dad_core.cli.train"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["serviceAccountName"] == "dad-runner"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dad-data", "mountPath": "/data"} in container["volumeMounts"]
    assert "Worker" not in build_pytorchjob(full_spec(num_nodes=1))["spec"]["pytorchReplicaSpecs"]


@pytest.mark.parametrize(
    ("build", "path", "value", "match"),
    [
        (build_trainjob, ("spec", "trainer", "numProcPerNode"), "4", "valid integer"),
        (build_trainjob, ("spec", "trainer", "numProcsPerNode"), 4, "not a field"),
        (build_trainjob, ("spec", "runtimeRef"), None, "runtimeRef"),
        (build_pytorchjob, ("spec", "pytorchReplicaSpecs", "Master", "replicas"), "two", "invalid literal"),
        (build_pytorchjob, ("spec", "nprocPerNode"), 4, "nprocPerNode"),
        (build_pytorchjob, ("spec", "runPolicy", "backofLimit"), 3, "not a field"),
    ],
)
def test_broken_bodies_fail_validation(build, path, value, match):
    body = build(full_spec())
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(LaunchError, match=match):
        validate_job_body(body)


# ------------------------------------------------------------------------------------------------ local backend


def test_local_backend_runs_every_rank_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.chdir(PROBE_DIR)
    lines: list[str] = []
    result = launch_training(
        backend="local",
        train_args=[str(tmp_path), "--flag"],
        nproc_per_node=2,
        module="_launch_probe",
        echo=lines.append,
    )
    ranks = sorted(json.loads(p.read_text())["rank"] for p in tmp_path.glob("rank*.json"))
    assert ranks == [0, 1]
    assert all(json.loads(p.read_text())["world_size"] == 2 for p in tmp_path.glob("rank*.json"))
    # The ranks share one pipe with torchrun's own banner, so a line may carry another process's text too.
    text = "\n".join(lines)
    assert "probe: rank 0 of 2 starting" in text and "probe: rank 1 of 2 starting" in text
    assert result.backend == "local"
    assert result.log_tail


def test_local_backend_failure_raises_with_the_workers_message(tmp_path, monkeypatch):
    monkeypatch.chdir(PROBE_DIR)
    with pytest.raises(LaunchError, match="exit code") as info:
        run_local([str(tmp_path), "--fail"], nproc_per_node=2, module="_launch_probe", echo=lambda line: None)
    message = str(info.value)
    assert "fails on purpose" in message
    assert "exitcode  : 3" in message
    assert "torch/distributed/run.py" not in message  # torchrun's own traceback is dropped


def test_local_single_process_failure_and_timeout(tmp_path, monkeypatch):
    monkeypatch.chdir(PROBE_DIR)
    with pytest.raises(LaunchError, match=r"exit code 3(.|\n)*rank 0 fails on purpose"):
        run_local([str(tmp_path), "--fail"], module="_launch_probe", echo=lambda line: None)
    start = time.monotonic()
    with pytest.raises(LaunchError, match="timed out"):
        run_local([str(tmp_path), "--sleep"], module="_launch_probe", timeout_s=1.0, echo=lambda line: None)
    assert time.monotonic() - start < 30


def test_unknown_backend_and_missing_job_spec():
    with pytest.raises(LaunchError, match="unknown training backend"):
        launch_training(backend="slurm", train_args=[])
    with pytest.raises(LaunchError, match="needs job="):
        launch_training(backend="kubernetes", train_args=[])


# ------------------------------------------------------------------------------------------------ kubernetes backend


def in_thread(fn, *args, **kwargs):
    """Run a blocking ``kubernetes`` client call off the event loop, which must stay free to serve kmock."""
    return asyncio.to_thread(fn, *args, **kwargs)


def api_client(kmock):
    from kubernetes import client

    return client.ApiClient(client.Configuration(host=str(kmock.url).rstrip("/")))


def small_spec(**overrides) -> JobSpec:
    return JobSpec(**{"name": "dad-train-k8s", "image": "registry.example.com/dad:1.0", "namespace": NS, **overrides})


def set_condition(kmock, resource, name, kind, reason="", message="", after_s=0.0, labels=None):
    """Play the training controller: once the job exists (with ``labels``), set a True condition on its status."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(api_client(kmock))
    condition = {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    time.sleep(after_s)
    for _ in range(500):
        try:
            job = api.get_namespaced_custom_object(*resource, name)
        except ApiException as err:
            if err.status != 404:
                raise
            job = None
        if job is not None and (labels or {}).items() <= (job["metadata"].get("labels") or {}).items():
            return api.patch_namespaced_custom_object_status(*resource, name, {"status": {"conditions": [condition]}})
        time.sleep(0.01)
    raise AssertionError(f"{name} was never created")


def create_pod(kmock, name, labels, *, phase="Running", exit_code=None):
    from kubernetes import client

    status: dict = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "node",
                "image": "img",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code}},
            }
        ]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"containers": [{"name": "node", "image": "img"}]},
        "status": status,
    }
    client.CoreV1Api(api_client(kmock)).create_namespaced_pod(NS, body)


def trainjob_pod_labels(job, node):
    return {
        "jobset.sigs.k8s.io/jobset-name": job,
        "jobset.sigs.k8s.io/replicatedjob-name": "node",
        "jobset.sigs.k8s.io/job-index": "0",
        "batch.kubernetes.io/job-completion-index": str(node),
    }


def get_job(kmock, resource, name):
    from kubernetes import client

    return client.CustomObjectsApi(api_client(kmock)).get_namespaced_custom_object(*resource, name)


def create_job(kmock, resource, body):
    from kubernetes import client

    return client.CustomObjectsApi(api_client(kmock)).create_namespaced_custom_object(*resource, body)


def list_jobs(kmock, resource):
    from kubernetes import client

    return client.CustomObjectsApi(api_client(kmock)).list_namespaced_custom_object(*resource)["items"]


@pytest.mark.asyncio
async def test_trainjob_is_created_watched_logged_and_cleaned_up(kmock):
    await in_thread(create_pod, kmock, "dad-train-k8s-node-0-0-abcde", trainjob_pod_labels("dad-train-k8s", 0))
    await in_thread(create_pod, kmock, "other-job-node-0-0-zzzzz", trainjob_pod_labels("other-job", 0))
    kmock["get /api/v1/namespaces/dad/pods/dad-train-k8s-node-0-0-abcde/log"] << (
        b"2026-01-01T00:00:00.5Z step 1 loss 2.30\n2026-01-01T00:00:01Z step 2 loss 2.10\n"
    )
    lines: list[str] = []
    launch = in_thread(
        launch_training,
        backend="kubernetes",
        train_args=["--config", "c.yaml"],
        nproc_per_node=2,
        job=small_spec(),
        api_client=api_client(kmock),
        echo=lines.append,
        cleanup="on_success",
        poll_interval_s=0.05,
    )
    controller = in_thread(set_condition, kmock, TRAINJOBS, "dad-train-k8s", "Complete", after_s=0.3)
    result, _ = await asyncio.gather(launch, controller)

    assert result.job_kind == "TrainJob"
    assert result.job_name == "dad-train-k8s"
    assert not result.reattached
    assert lines == ["step 1 loss 2.30", "step 2 loss 2.10"]  # polled several times, each line echoed once
    created = kmock[kmock.resource("trainer.kubeflow.org/v1alpha1/trainjobs"), "post"][0].data
    assert created["spec"]["trainer"]["command"][-2:] == ["--config", "c.yaml"]
    assert created["spec"]["trainer"]["numProcPerNode"] == 2
    assert await in_thread(list_jobs, kmock, TRAINJOBS) == []  # cleanup="on_success" deleted it


@pytest.mark.asyncio
async def test_existing_job_is_reattached_not_created_twice(kmock):
    await in_thread(create_job, kmock, TRAINJOBS, build_trainjob(small_spec(labels={"first": "launch"})))
    launch = in_thread(
        run_kubernetes_job, small_spec(), api_client=api_client(kmock), cleanup="never", echo=lambda line: None, **FAST
    )
    controller = in_thread(set_condition, kmock, TRAINJOBS, "dad-train-k8s", "Complete", after_s=0.2)
    result, _ = await asyncio.gather(launch, controller)

    assert result.reattached
    (job,) = await in_thread(list_jobs, kmock, TRAINJOBS)
    assert job["metadata"]["labels"] == {"first": "launch"}  # the original object, not a second one


@pytest.mark.asyncio
async def test_create_that_failed_transiently_but_went_through_is_reattached(kmock):
    # kmock stores the object and then answers 503: the retry gets 409 and attaches instead of duplicating.
    kmock["post", kmock.resource("trainer.kubeflow.org/v1alpha1/trainjobs")][:1] << KubernetesError(
        status=503, reason="ServiceUnavailable", message="etcd is busy"
    )
    launch = in_thread(
        run_kubernetes_job, small_spec(), api_client=api_client(kmock), cleanup="never", echo=lambda line: None, **FAST
    )
    controller = in_thread(set_condition, kmock, TRAINJOBS, "dad-train-k8s", "Complete", after_s=0.2)
    result, _ = await asyncio.gather(launch, controller)
    assert result.reattached
    assert len(kmock[kmock.resource("trainer.kubeflow.org/v1alpha1/trainjobs"), "post"]) == 2  # retried once
    assert len(await in_thread(list_jobs, kmock, TRAINJOBS)) == 1


@pytest.mark.asyncio
async def test_failed_job_raises_with_the_failing_pods_log(kmock):
    await in_thread(create_pod, kmock, "dad-train-k8s-node-0-0-aaaaa", trainjob_pod_labels("dad-train-k8s", 0))
    await in_thread(
        create_pod,
        kmock,
        "dad-train-k8s-node-0-1-bbbbb",
        trainjob_pod_labels("dad-train-k8s", 1),
        phase="Failed",
        exit_code=1,
    )
    kmock["get /api/v1/namespaces/dad/pods/dad-train-k8s-node-0-1-bbbbb/log"] << (
        b"Traceback (most recent call last):\nRuntimeError: CUDA out of memory on node 1\n"
    )
    launch = in_thread(
        run_kubernetes_job,
        small_spec(),
        api_client=api_client(kmock),
        cleanup="on_success",
        echo=lambda line: None,
        **FAST,
    )
    controller = in_thread(
        set_condition,
        kmock,
        TRAINJOBS,
        "dad-train-k8s",
        "Failed",
        reason="JobSetFailed",
        message="node-0 failed",
        after_s=0.2,
    )
    with pytest.raises(LaunchError) as info:
        await asyncio.gather(launch, controller)
    message = str(info.value)
    assert "TrainJob dad/dad-train-k8s failed (JobSetFailed: node-0 failed)" in message
    assert "pod dad-train-k8s-node-0-1-bbbbb" in message
    assert "CUDA out of memory on node 1" in message
    assert len(await in_thread(list_jobs, kmock, TRAINJOBS)) == 1  # on_success keeps a failed job to inspect


@pytest.mark.asyncio
async def test_a_previously_failed_job_is_replaced_on_retry(kmock):
    await in_thread(create_job, kmock, TRAINJOBS, build_trainjob(small_spec(labels={"attempt": "1"})))
    await in_thread(set_condition, kmock, TRAINJOBS, "dad-train-k8s", "Failed")
    launch = in_thread(
        run_kubernetes_job,
        small_spec(labels={"attempt": "2"}),
        api_client=api_client(kmock),
        cleanup="never",
        echo=lambda line: None,
        **FAST,
    )
    controller = in_thread(set_condition, kmock, TRAINJOBS, "dad-train-k8s", "Complete", labels={"attempt": "2"})
    result, _ = await asyncio.gather(launch, controller)
    assert not result.reattached
    job = await in_thread(get_job, kmock, TRAINJOBS, "dad-train-k8s")
    assert job["metadata"]["labels"] == {"attempt": "2"}


@pytest.mark.asyncio
async def test_timeout_deletes_the_job(kmock):
    from kubernetes.client.exceptions import ApiException

    start = time.monotonic()
    with pytest.raises(LaunchError, match="timed out after 1s and was deleted"):
        await in_thread(
            run_kubernetes_job, small_spec(timeout_s=1), api_client=api_client(kmock), echo=lambda line: None, **FAST
        )
    assert time.monotonic() - start < 10
    with pytest.raises(ApiException) as info:
        await in_thread(get_job, kmock, TRAINJOBS, "dad-train-k8s")
    assert info.value.status == 404


@pytest.mark.asyncio
async def test_pytorchjob_succeeds_and_is_deleted_with_cleanup_always(kmock):
    lines: list[str] = []
    master = {
        "training.kubeflow.org/job-name": "dad-train-k8s",
        "training.kubeflow.org/replica-type": "master",
        "training.kubeflow.org/replica-index": "0",
    }
    await in_thread(create_pod, kmock, "dad-train-k8s-master-0", master)
    kmock["get /api/v1/namespaces/dad/pods/dad-train-k8s-master-0/log"] << b"2026-01-01T00:00:00Z master says hi\n"
    launch = in_thread(
        run_kubernetes_job,
        small_spec(),
        kind="pytorchjob",
        api_client=api_client(kmock),
        cleanup="always",
        echo=lines.append,
        **FAST,
    )
    controller = in_thread(set_condition, kmock, PYTORCHJOBS, "dad-train-k8s", "Succeeded", after_s=0.2)
    result, _ = await asyncio.gather(launch, controller)
    assert result.job_kind == "PyTorchJob"
    assert lines == ["master says hi"]
    assert await in_thread(list_jobs, kmock, PYTORCHJOBS) == []


@pytest.mark.asyncio
async def test_missing_crd_and_missing_namespace_give_clear_errors(kmock):
    # kmock serves any resource; a cluster without the CRD answers 404 on the plural, emulated here.
    kmock["post", kmock.resource("trainer.kubeflow.org/v1alpha1/trainjobs")] << KubernetesError(
        status=404, reason="NotFound", message="the server could not find the requested resource"
    )
    kmock["post", kmock.resource("kubeflow.org/v1/pytorchjobs")] << KubernetesError(
        status=404, reason="NotFound", message='namespaces "dad" not found', details={"name": NS, "kind": "namespaces"}
    )
    with pytest.raises(LaunchError, match="TrainJob CRD not found on the cluster.*install Kubeflow Trainer v2.3"):
        await in_thread(run_kubernetes_job, small_spec(), api_client=api_client(kmock), **FAST)
    with pytest.raises(LaunchError, match="namespace 'dad' does not exist"):
        await in_thread(run_kubernetes_job, small_spec(), kind="pytorchjob", api_client=api_client(kmock), **FAST)


def test_unreachable_api_server_gives_up_with_a_clear_message():
    from kubernetes import client

    unreachable = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))  # discard port: refused
    with pytest.raises(LaunchError, match="failed 2 times, giving up"):
        run_kubernetes_job(
            small_spec(),
            api_client=unreachable,
            poll_interval_s=0.01,
            retry=RetryPolicy(attempts=2, initial_delay_s=0.01),
        )


def test_no_cluster_credentials_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(LaunchError, match="no Kubernetes credentials"):
        run_kubernetes_job(small_spec())


@pytest.mark.asyncio
async def test_failure_after_the_pods_are_gone_reports_the_streamed_lines(kmock):
    from kubernetes import client

    pod = "dad-train-k8s-node-0-0-ccccc"
    await in_thread(create_pod, kmock, pod, trainjob_pod_labels("dad-train-k8s", 0))
    kmock[f"get /api/v1/namespaces/dad/pods/{pod}/log"] << b"2026-01-01T00:00:00Z loading shard 7\n"

    def controller():  # the Job controller removes the pods of a failed job before the TrainJob turns Failed
        time.sleep(0.3)
        client.CoreV1Api(api_client(kmock)).delete_namespaced_pod(pod, NS)
        set_condition(kmock, TRAINJOBS, "dad-train-k8s", "Failed", reason="BackoffLimitExceeded")

    launch = in_thread(run_kubernetes_job, small_spec(), api_client=api_client(kmock), echo=lambda line: None, **FAST)
    with pytest.raises(LaunchError, match=r"no pods found for the job(.|\n)*loading shard 7"):
        await asyncio.gather(launch, in_thread(controller))

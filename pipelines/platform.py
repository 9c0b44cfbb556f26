"""Names of the cluster objects the pipeline runs against, as `k8s/` creates them.

The manifests in `k8s/base` create every object named here (namespace, service account, PVCs,
the S3 credentials Secret, the MLflow and object-store Services, the Kubeflow Trainer runtime),
and `tests/k8s/test_manifests.py` checks that both sides agree. The pipeline uses these values as
parameter defaults, so a deployment that renames something changes it here and in `k8s/`
together. Only plain literals live here: importing this module reads no environment and needs no
third-party package.
"""

NAMESPACE = "dad"
SERVICE_ACCOUNT = "dad-pipeline-runner"  # runs submitted with it may launch and watch TrainJobs
DATASETS_PVC = "dad-datasets"
CACHE_PVC = "dad-teacher-cache"
# Where the steps mount the two volumes (and where `--local --runner docker` mounts their local folders).
WORK_MOUNT = "/mnt/dad-work"  # the teacher-cache volume: the shared workdir of the cache workers and training
DATASETS_MOUNT = "/mnt/datasets"  # the datasets volume

S3_SECRET = "dad-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the Secret's keys, also the env var names
S3_ENDPOINT_URL = "http://seaweedfs-s3.dad.svc.cluster.local:8333"
MLFLOW_ARTIFACTS_BUCKET = "mlflow-artifacts"  # written by the MLflow server only (proxied artifacts)
DVC_BUCKET = "dvc-store"  # the DVC remote: s3://dvc-store/...

MLFLOW_TRACKING_URI = "http://mlflow.dad.svc.cluster.local:5000"
# MLflow basic-auth credentials of the steps and training pods. Only k8s/overlays/prod creates this Secret (its MLflow
# requires a login); dev's MLflow has no authentication and no such Secret, so pods use it only where it exists.
MLFLOW_SECRET = "dad-mlflow-credentials"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # the Secret's keys, also the env vars
TRAINING_RUNTIME = "dad-torch-distributed"  # a ClusterTrainingRuntime (cluster-scoped)

# Pods with this label may reach MLflow and the object store (k8s/base/network-policies.yaml).
# Every pipeline step sets it; the training runtime sets it on the training pods.
CLIENT_POD_LABEL = ("dad.kubeflow/role", "client")

# uid and gid of the project image's non-root user "dad" (Dockerfile): pipeline steps and training pods run as it.
RUN_AS_USER = 10001

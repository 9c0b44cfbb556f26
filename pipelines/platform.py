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

S3_SECRET = "dad-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the Secret's keys, also the env var names
S3_ENDPOINT_URL = "http://seaweedfs-s3.dad.svc.cluster.local:8333"
MLFLOW_ARTIFACTS_BUCKET = "mlflow-artifacts"  # written by the MLflow server only (proxied artifacts)
DVC_BUCKET = "dvc-store"  # the DVC remote: s3://dvc-store/...

MLFLOW_TRACKING_URI = "http://mlflow.dad.svc.cluster.local:5000"
TRAINING_RUNTIME = "dad-torch-distributed"  # a ClusterTrainingRuntime (cluster-scoped)

# Pods with this label may reach MLflow and the object store (k8s/base/network-policies.yaml).
# Every pipeline step sets it; the training runtime sets it on the training pods.
CLIENT_POD_LABEL = ("dad.kubeflow/role", "client")

"""The one container image every pipeline step and training pod runs (built from the repo's Dockerfile)."""

from dad_core._version import __version__

DAD_IMAGE_REPO = "ghcr.io/dad-on-kubeflow/dad"
DAD_IMAGE = f"{DAD_IMAGE_REPO}:{__version__}"

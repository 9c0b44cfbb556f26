"""The one container image every pipeline step and training pod runs (built from the repo's Dockerfile).

The default is ``ghcr.io/dad-on-kubeflow/dad:<version>``; ``DAD_IMAGE`` in the environment when the components are
imported replaces it (the pipeline scripts' ``--image`` sets it before they import them), so a compiled spec names
the image it was compiled for, in every step and in the training job.
"""

import os

from dad_core._version import __version__

DAD_IMAGE_REPO = "ghcr.io/dad-on-kubeflow/dad"
DEFAULT_IMAGE = f"{DAD_IMAGE_REPO}:{__version__}"
DAD_IMAGE = os.environ.get("DAD_IMAGE", "").strip() or DEFAULT_IMAGE

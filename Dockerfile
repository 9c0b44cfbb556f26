# The project image: every pipeline step and every training pod runs it
# (components/_image.py: DAD_IMAGE = ghcr.io/dad-on-kubeflow/dad:<package version>).
# Build with `make image`, i.e. `docker build -t $(DAD_IMAGE) .`

# CUDA 13.0 build of the torch/torchvision pair that the locks pin; the version check below fails
# the build if the two ever disagree. Any base with Python 3.11+, pip, useradd and that torch pair
# will do (`make test-container` builds one from Debian's packages: container/test_base.sh).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Where pip finds packages during the build, for builders without internet access: a mirror
# (--build-arg PIP_INDEX_URL=https://mirror.example.com/simple) or a wheel folder served over
# HTTP (PIP_NO_INDEX=1 PIP_FIND_LINKS=http://..., as `make test-container` does). Build arguments
# only: pip reads them from the environment of the RUN lines; they are not kept in the image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS

# MPLCONFIGDIR: the steps run with a read-only root file system and a writable /tmp (as their pods);
# GIT_PYTHON_REFRESH: MLflow asks GitPython for a commit, and the image has no git: no warning for it.
# PyTorch's images use the distribution's system Python, which may mark itself "externally
# managed" (PEP 668); inside an image of our own, installing into it is what we want.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    MPLCONFIGDIR=/tmp/matplotlib \
    GIT_PYTHON_REFRESH=quiet

WORKDIR /opt/dad

# Dependencies get their own layer, so editing the source does not reinstall them. The runtime
# lock is the complete, resolved set the product needs (no test or lint tools), hence --no-deps.
# Its CUDA torch stack (torch, torchvision, triton,
# nvidia-*, cuda-*) is already in the base image at the same versions: those lines are skipped,
# so pip neither downloads a second copy nor swaps the base image's build for another one.
COPY requirements.runtime.lock.txt ./
RUN set -eu; \
    grep -vE '^(torch|torchvision|triton|nvidia-[A-Za-z0-9_.-]+|cuda-[A-Za-z0-9_.-]+)==' requirements.runtime.lock.txt \
        > /tmp/requirements.txt; \
    python3 -m pip install --no-deps -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt
# Plain RUN lines only (no heredocs, no syntax directive): any builder can build this offline.
RUN python3 -c 'import re, torch, torchvision; \
pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", open("requirements.runtime.lock.txt").read(), re.M)); \
have = {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0]}; \
assert have == pins, f"the base image has {have}, the lock pins {pins}"; \
print("torch", torch.__version__, "CUDA", torch.version.cuda)'

# The package itself, then a check that every installed distribution's requirements are met.
COPY pyproject.toml README.md ./
COPY dad_core ./dad_core
RUN python3 -m pip install --no-deps . \
    && python3 -m pip check \
    && python3 -c "import dad_core; print('dad_core', dad_core.__version__)"

# A fixed numeric uid/gid, clear of the users base images ship (Ubuntu's uid 1000), so that
# Kubernetes can verify runAsNonRoot and the training runtime's runAsUser (10001) matches.
RUN groupadd --gid 10001 dad \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dad
USER 10001:10001
WORKDIR /home/dad
# The steps read their defaults from params.yaml in the working folder, as they do in a checkout.
COPY --chown=10001:10001 params.yaml ./

CMD ["dad", "--help"]

# DAD on Kubeflow. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DAD_IMAGE ?= $(shell $(PY) -c "from components._image import DAD_IMAGE; print(DAD_IMAGE)" 2>/dev/null)
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.PHONY: help install browser run test test-container test-fast lint format compile render-k8s image bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.lock.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed  ## create .venv from the lock file (torch 2.14.1, timm, open_clip, kfp, mlflow, dvc)

# Debian's Chromium for the MLflow UI tests (tests/ui, driven by Playwright from the lock; nothing else is downloaded).
# Idempotent: nothing happens when it is there; as root with apt-get it is installed; otherwise the UI tests fail and
# say what to install.
CHROMIUM ?= /usr/bin/chromium
browser:  ## install Debian's Chromium for the MLflow UI tests when it is missing (apt-get, as root)
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for tests/ui"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else \
		echo "warning: $(CHROMIUM) is missing and can't be installed here (needs apt-get as root): tests/ui will fail" >&2; \
	fi

run: install  ## the main job: the whole pipeline on the embedded defaults, locally
	$(PY) pipelines/dad_pipeline.py --local

test: install browser  ## lint, then every test tier that needs no GPU (unit, slow, integration, the MLflow UI)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not gpu and not container"

# Builds the image from nothing with a dockerd of its own (installs docker.io and mmdebstrap when missing, as root;
# its data root is a cache folder outside the clone, $$DAD_CONTAINER_CACHE), then runs tests/container: the image's
# checks and the whole pipeline with --runner docker. See container/test_container.sh.
test-container: install  ## build the image here (own dockerd, Debian base) and run the whole pipeline in containers
	PY=$(PY) container/test_container.sh

test-fast: install  ## unit tests only
	$(PY) -m pytest -m "not slow and not integration and not gpu and not container"

lint: install  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

compile: install  ## write the KFP pipeline spec to dad_pipeline.yaml
	$(PY) pipelines/dad_pipeline.py --compile --output dad_pipeline.yaml

render-k8s: install  ## render every kustomize overlay
	@for o in k8s/overlays/*/; do echo "--- $$o"; $(VENV)/bin/kubectl kustomize $$o > /dev/null && echo ok; done

image:  ## build the project image (needs a Docker engine)
	docker build -t $(DAD_IMAGE) .

bench: install  ## CPU benchmarks on tiny configurations (add ARGS=--full on a GPU)
	$(PY) bench/generation.py $(ARGS); $(PY) bench/training.py $(ARGS); $(PY) bench/vqgan.py $(ARGS)

clean:  ## remove local outputs (keeps .venv)
	rm -rf local_outputs runs mlflow.db mlartifacts .pytest_cache

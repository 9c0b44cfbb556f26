#!/usr/bin/env bash
# make test-container: build the project image from nothing on this machine, then run the whole pipeline in it.
#
#  1. docker.io and mmdebstrap (apt-get, as root) when missing;
#  2. a dockerd of its own, stopped at the end, whose data root is a cache folder outside the clone
#     ($DAD_CONTAINER_CACHE, default ~/.cache/dad-on-kubeflow/container), so that later runs reuse the base image;
#  3. the runtime lock's wheels, fetched once by this machine's pip into that cache folder;
#  4. the test base (container/test_base.sh: Debian bookworm + the locks' torch pair), built offline;
#  5. the project image, `docker build --build-arg BASE_IMAGE=<test base>` with pip pointed at the wheel folder;
#  6. tests/container: uid 10001, pip check and `dad --version` in the image, then the whole pipeline with
#     `--local --runner docker` against an mlflow server with SeaweedFS, asserting a registered champion.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
cache=${DAD_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dad-on-kubeflow/container}
image=${DAD_TEST_IMAGE:-dad-on-kubeflow/dad:test}
mkdir -p "$cache"
started=$(date +%s)
step() { echo "== test-container [$(($(date +%s) - started))s] $*"; }

# 1. the tools
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if ((${#need[@]})); then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "error: make test-container needs ${need[*]} (Debian: apt-get install ${need[*]}, as root)" >&2
        exit 1
    fi
    step "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. a Docker engine of our own: no bridge or iptables (the containers use the host network), its own socket
run=$(mktemp -d /tmp/dad-docker.XXXXXX)
export DOCKER_HOST="unix://$run/docker.sock" DOCKER_BUILDKIT=0
dockerd_pid="" wheel_server=""
cleanup() {
    [ -n "$wheel_server" ] && kill "$wheel_server" 2>/dev/null
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null
    fi
    # dockerd leaves its network namespace mounted under its exec root
    grep -o " $run/[^ ]*" /proc/mounts | xargs -r -n1 umount 2>/dev/null
    rm -rf "$run" || true
}
trap cleanup EXIT
step "starting dockerd (data root $cache/docker)"
dockerd --data-root "$cache/docker" --exec-root "$run/exec" --pidfile "$run/dockerd.pid" --host "$DOCKER_HOST" \
    --storage-driver overlay2 --iptables=false --ip6tables=false --bridge=none >"$run/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 120); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$run/dockerd.log" >&2; exit 1; }
    sleep 0.5
done
docker version --format 'dockerd {{.Server.Version}}'

# 3. the wheels of the runtime lock, through this machine's pip configuration (its index, mirrors and CA bundle)
step "runtime wheels into $cache/wheels"
"$PY" -m pip wheel --quiet --no-deps --find-links "$cache/wheels" -w "$cache/wheels" -r requirements.runtime.lock.txt \
    2> >(grep -v "is neither a file nor a directory" >&2)  # pip's note on each index lacking a package

# 4. the test base; its tag changes with the script and the torch pins, so a change rebuilds it
base_key=$(cat container/test_base.sh <(grep -E '^(torch|torchvision)==' requirements.runtime.lock.txt) | sha256sum)
base="dad-test-base:bookworm-${base_key:0:12}"
step "test base $base"
container/test_base.sh "$base" "$cache/wheels"

# 5. the project image, pip reading the wheel folder over loopback (a build cannot mount it)
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m http.server --bind 127.0.0.1 --directory "$cache/wheels" "$port" >"$run/wheels.log" 2>&1 &
wheel_server=$!
step "building $image on $base"
docker build --network host --build-arg "BASE_IMAGE=$base" --build-arg PIP_NO_INDEX=1 \
    --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" -t "$image" .
kill "$wheel_server" && wheel_server=""
docker image prune --force >/dev/null  # the previous build's layers, now untagged

# 6. the image's checks and the pipeline in containers
step "tests/container"
DAD_TEST_IMAGE="$image" "$PY" -m pytest -m container tests/container -p no:cacheprovider "$@"
step "passed"

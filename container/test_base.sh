#!/usr/bin/env bash
# The base image `make test-container` builds the project image on, made offline from Debian's packages:
# a bookworm root file system (Python 3.11, pip, useradd) by mmdebstrap, imported into Docker, plus the
# torch/torchvision pair of the locks installed from a local wheel folder. No image is pulled.
#
#   container/test_base.sh TAG WHEELS     (the Docker engine of $DOCKER_HOST; WHEELS holds the runtime lock's wheels)
#
# Nothing happens when TAG exists. DEBIAN_MIRROR overrides the Debian mirror (default: deb.debian.org).
set -euo pipefail
tag=$1 wheels=$(realpath "$2")
cd "$(dirname "$0")/.."

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "test base $tag: already built"
    exit 0
fi
scratch=$(mktemp -d)
builder="dad-test-base-$$"
stage="$tag-rootfs"
cleanup() {
    docker rm -f "$builder" >/dev/null 2>&1 || true
    docker rmi "$stage" >/dev/null 2>&1 || true
    rm -rf "$scratch"
}
trap cleanup EXIT

echo "test base: Debian bookworm root file system (mmdebstrap, about 2 minutes)"
mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,ca-certificates,passwd \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    bookworm "$scratch/rootfs.tar" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
docker import --change 'CMD ["python3"]' "$scratch/rootfs.tar" "$stage" >/dev/null

# shellcheck disable=SC2046 # one word per pin
pins=$(grep -E '^(torch|torchvision)==' requirements.runtime.lock.txt)
echo "test base: $(echo $pins) from $wheels (about 3 minutes)"
docker run --name "$builder" --network none -v "$wheels:/wheels:ro" "$stage" \
    python3 -m pip install --quiet --root-user-action=ignore --break-system-packages --no-index --find-links /wheels --no-cache-dir $pins
docker commit --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' --change 'CMD ["python3"]' "$builder" "$tag" >/dev/null
echo "test base: $tag built"

#!/bin/sh
# Build the serving image where no public base image can be pulled (run as root, podman and mmdebstrap installed):
#   1. a Debian bookworm root file system from the package mirror (mmdebstrap), imported as the base image;
#   2. the Python wheels fetched with this machine's pip (its index, mirror or proxy) into container/wheels/;
#   3. podman build with chroot isolation and no index: pip inside installs from those wheels only.
#
#   container/build_image.sh [TAG]            # default tag: brain-mri-serve
#   BASE=registry.hospital.example/python:3.11 container/build_image.sh     # build on a site's base instead
#   REQUIREMENTS=requirements.txt container/build_image.sh                  # with PyTorch (Grad-CAM), ~1 GB more
#   PYTHON=/path/to/python                    # the pip that fetches the wheels: the base's Python version (3.11)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-brain-mri-serve}
python=${PYTHON:-python3}
requirements=${REQUIREMENTS:-requirements-serve.txt}
base=${BASE:-localhost/brain-mri-base:bookworm}
[ "$(id -u)" = 0 ] || { echo "build_image.sh: run as root (mmdebstrap and podman's chroot isolation need it)" >&2; exit 2; }
if [ -z "${BASE:-}" ] && ! podman image exists "$base"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # apt's sources are the host's (the Debian mirror it is configured with); passwd brings useradd
    mmdebstrap --quiet --variant=apt --include=python3,python3-venv,passwd,ca-certificates bookworm "$tmp/rootfs.tar"
    podman import --quiet --change 'CMD ["/bin/bash"]' "$tmp/rootfs.tar" "$base" >/dev/null
    echo "base image $base made from the Debian mirror"
fi
mkdir -p "$here/container/wheels"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$here/container/wheels" \
    -r "$here/$requirements"
podman build --isolation=chroot --format docker --build-arg "BASE=$base" --build-arg "REQUIREMENTS=$requirements" \
    --build-arg PIP_NO_INDEX=1 --tag "$tag" "$here"

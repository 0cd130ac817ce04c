#!/usr/bin/env bash
# Install what ebsfs needs on a Debian machine: system packages (as root) and a
# virtual environment in .venv with ebsfs and its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config gcc sleuthkit e2fsprogs fdisk util-linux mount attr openssl xfsprogs ntfs-3g faketime qemu-utils libnbd-bin)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
extras="test,fleet"   # fleet: dask for `ebsfs scan` and its tests
[ "${EBSFS_BENCH:-0}" = 1 ] && extras="test,fleet,bench"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import pyfuse3, trio, boto3, cachetools, tqdm" \
    || { echo "setup: the Python packages did not install" >&2; exit 1; }
echo "setup: ready (.venv/bin/ebsfs)"

#!/usr/bin/env bash
# Installs what the tests need besides Rust and ONNX Runtime: the Mosquitto broker, PostgreSQL
# (the fleet tests start their own cluster with its initdb), Chromium and fonts (the fleet dashboard
# is rendered headless) from Debian, a Python venv with the official `openai` package (PyPI), and a
# second venv, .venv-s3, with moto's S3-compatible server (PyPI) for the fleet registry's S3 tests.
# Idempotent; run by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.52.0
MOTO_VERSION=5.2.5

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "test-deps: $* is missing and installing it needs root: sudo apt-get install -y $*" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ ! -x /usr/sbin/mosquitto ]; then
    echo "test-deps: installing mosquitto"
    apt_install mosquitto
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "test-deps: installing postgresql"
    apt_install postgresql
fi
if ! command -v chromium >/dev/null; then
    echo "test-deps: installing chromium and fonts"
    apt_install chromium fonts-dejavu-core fonts-liberation
fi
command -v curl >/dev/null || apt_install curl
command -v openssl >/dev/null || apt_install openssl
# The deployment tests: systemd-analyze on the units, dpkg-deb and cargo-deb for the package.
command -v systemd-analyze >/dev/null || apt_install systemd
command -v dpkg-deb >/dev/null || apt_install dpkg
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb --version 3.8.0

if ! .venv/bin/python -c "import openai" 2>/dev/null; then
    echo "test-deps: creating .venv with openai $OPENAI_VERSION"
    python3 -m venv .venv
    .venv/bin/pip install --quiet "openai==$OPENAI_VERSION"
fi
if ! .venv-s3/bin/python -c "import moto.server" 2>/dev/null; then
    echo "test-deps: creating .venv-s3 with moto[server] $MOTO_VERSION"
    python3 -m venv .venv-s3
    .venv-s3/bin/pip install --quiet "moto[server]==$MOTO_VERSION"
fi

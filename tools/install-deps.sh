#!/usr/bin/env bash
# Idempotent installer of everything vtpcm needs on Debian 12: system packages,
# a running RabbitMQ, and the project's virtualenv (.venv) with test, lint and
# docs tools.
# Usage: tools/install-deps.sh   (as root; safe to run again)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VTPCM_VENV:-$ROOT/.venv}

PKGS=(swtpm swtpm-tools libtss2-dev pkg-config gcc python3-dev libvirt-dev
      libvirt-daemon-system libvirt-clients qemu-system-x86 busybox-static cpio
      tpm2-tools linux-image-cloud-amd64 gnutls-bin procps iproute2 shellcheck)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# RabbitMQ: use the local one if it answers, else install/start it.
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    if ! command -v rabbitmq-server >/dev/null; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rabbitmq-server
    fi
    rabbitmq-server -detached || true
    for _ in $(seq 1 60); do
        (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break
        sleep 1
    done
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || { echo "install-deps: RabbitMQ did not start" >&2; exit 1; }
fi

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.vtpcm-deps-$(sha256sum setup.cfg | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[test,lint,docs]"
    touch "$stamp"
fi
echo "install-deps: ready ($VENV)"

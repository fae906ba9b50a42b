#!/usr/bin/env bash
# Idempotent installer of everything vtpcm needs on Debian 12: system packages,
# a running RabbitMQ, a running PostgreSQL that trusts local connections of its
# postgres user (the engine's functional tests run on it; required, never
# skipped), a running MariaDB (the real-Nova lab's databases), and the project's virtualenv (.venv) with test, lint and docs tools.
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

# PostgreSQL: use the local one if it answers, else install/start a cluster.
# The tests connect as postgres@127.0.0.1 without a password (a test machine's
# setting: one pg_hba line, marked, for that user from 127.0.0.1 only).
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    if ! command -v pg_lsclusters >/dev/null; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
    fi
    pg_version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -1)
    [ -n "$pg_version" ] || { echo "install-deps: no PostgreSQL server installed" >&2; exit 1; }
    if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$pg_version main"; then
        pg_createcluster "$pg_version" main
    fi
    hba=/etc/postgresql/$pg_version/main/pg_hba.conf
    if ! grep -q "vtpcm tests" "$hba"; then
        sed -i '1i host all postgres 127.0.0.1/32 trust  # vtpcm tests (tools/install-deps.sh)' "$hba"
    fi
    pg_ctlcluster "$pg_version" main start || pg_ctlcluster "$pg_version" main reload
    for _ in $(seq 1 60); do
        (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && break
        sleep 1
    done
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null || { echo "install-deps: PostgreSQL did not start" >&2; exit 1; }
fi

# MariaDB: the real-Nova lab's databases (tests/e2e_nova) and the engine's
# migration tests use root@127.0.0.1 without a password. Use the local server
# if it answers, else install and start one and let root in over TCP with an
# empty password (a test machine's setting; unix-socket login stays allowed).
if ! (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null; then
    if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mariadb-server
    fi
    service mariadb start >/dev/null 2>&1 || (cd / && setsid mysqld_safe >/dev/null 2>&1 &)
    for _ in $(seq 1 60); do
        (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null && break
        sleep 1
    done
    (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null || { echo "install-deps: MariaDB did not start" >&2; exit 1; }
    mariadb -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; FLUSH PRIVILEGES;"
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

#!/usr/bin/env bash
# Idempotent installer of the real-Nova lab's services virtualenv: Nova 34.0.0
# (api, conductor, scheduler, compute), placement 16.0.0, glance 33.0.0,
# gunicorn, PyMySQL, libvirt-python and python-openstackclient, pinned by
# tools/nova-services-constraints.txt, plus vtpcm itself (a copy, not editable,
# so the lab users that run nova-compute can read it; refreshed whenever the
# sources change) and the nova/virt/vtpcm shim. Also the Debian packages the
# real-Nova lab needs (qemu-utils for qemu-img, sudo for privsep, openssh-server
# for the hosts' sshds).
#
# Separate from .venv-nova (Nova's functional harness): nova-compute runs as a
# lab user, so the venv must be on a world-executable interpreter
# (/usr/bin/python3.11, not a pyenv build under /root) in a world-traversable
# directory; the functional harness needs neither.
#
# Usage: tools/install-nova-services.sh      (as root; ~2 s when done)
# Prints nothing but progress; the venv path is $(tools/install-nova-services.sh --print-venv).
# Environment: VTPCM_NOVA_SVC_VENV  venv path (default /var/lib/vtpcm-lab/nova-svc-<checkout hash>)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VTPCM_NOVA_SVC_VENV:-/var/lib/vtpcm-lab/nova-svc-$(echo "$ROOT" | sha256sum | cut -c1-8)}
if [ "${1:-}" = "--print-venv" ]; then
    echo "$VENV"
    exit 0
fi
PY=/usr/bin/python3.11
CONSTRAINTS=$ROOT/tools/nova-services-constraints.txt
PIP_TIMEOUT=${VTPCM_NOVA_PIP_TIMEOUT:-1800}
REQS=(nova==34.0.0 openstack-placement==16.0.0 glance==33.0.0 gunicorn PyMySQL
      libvirt-python python-openstackclient 'SQLAlchemy<2.1')
# openssh-server: the lab runs an sshd of its own per host (cold migration,
# resize); the package's own service is not needed
PKGS=(qemu-utils sudo python3.11-venv openssh-server)

log() { echo "install-nova-services: $*"; }

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The dependencies' stamp covers the pins; vtpcm's covers its sources.
deps_key=$(sha256sum "$CONSTRAINTS" | cut -c1-16)
src_key=$( (cat setup.cfg nova_shim/nova/virt/vtpcm/__init__.py;
            find vtpcm_common vtpcm_nova vtpcm_agent vtpcm_lab -type f \
                \( -name '*.py' -o -name '*.sh' -o -name '*.ini' \) -print0 \
                | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
deps_stamp="$VENV/.vtpcm-svc-deps-$deps_key"
src_stamp="$VENV/.vtpcm-svc-src-$src_key"
if [ -e "$deps_stamp" ] && [ -e "$src_stamp" ] && [ -x "$VENV/bin/python" ]; then
    log "ready ($VENV)"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
chmod 0755 "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock -w 1800 9 || { log "another install holds $VENV.lock for 30 min" >&2; exit 1; }

pip() {
    (cd / && timeout "$PIP_TIMEOUT" "$VENV/bin/python" -m pip "$@") \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

if [ ! -e "$deps_stamp" ] || [ ! -x "$VENV/bin/python" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV with $PY"
        "$PY" -m venv "$VENV"
    fi
    rm -f "$VENV"/.vtpcm-svc-deps-*
    log "installing Nova 34, placement, glance and clients (pinned)"
    pip install -q -c "$CONSTRAINTS" pip
    pip install -q -c "$CONSTRAINTS" "${REQS[@]}"
    touch "$deps_stamp"
fi

rm -f "$VENV"/.vtpcm-svc-src-*
log "installing vtpcm (a copy of $ROOT) and the nova/virt/vtpcm shim"
pip install -q --no-deps --force-reinstall "$ROOT"
tools/install-nova-shim.sh "$VENV/bin/python" >/dev/null
chmod -R a+rX "$VENV"
touch "$src_stamp"
log "ready ($VENV)"

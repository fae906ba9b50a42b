#!/usr/bin/env bash
# Idempotent installer of the Nova 34.0.0 functional-test virtualenv (.venv-nova):
# nova==34.0.0 with everything its own functional harness needs (placement,
# oslotest, fixtures, testtools, ddt, requests-mock, wsgi-intercept, ...), pytest,
# and vtpcm itself (editable, no extras), all pinned by tools/nova-constraints.txt.
# Separate from .venv because the main suite must run without Nova.
#
# Usage: tools/install-nova-env.sh          (safe to run again; ~1 s when done)
# Then:  .venv-nova/bin/python -m pytest -q tests/nova_functional
#
# Environment: VTPCM_NOVA_VENV  the venv path (default <repo>/.venv-nova)
#              PYTHON           the interpreter to build it with (default python3.11)
# Needs (from tools/install-deps.sh): libtss2-dev pkg-config gcc, to build
# tpm2-pytss (a vtpcm install_requires, sdist only) unless pip has it cached.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VTPCM_NOVA_VENV:-$ROOT/.venv-nova}
PY=${PYTHON:-python3.11}
CONSTRAINTS=$ROOT/tools/nova-constraints.txt
PIP_TIMEOUT=${VTPCM_NOVA_PIP_TIMEOUT:-1800}

# Top-level requirements; every version (and every transitive one) is pinned in
# $CONSTRAINTS. libvirt-python is not needed: the harness uses Nova's fakelibvirt.
REQS=(
    nova==34.0.0
    openstack-placement
    'SQLAlchemy<2.1'
    oslotest fixtures testtools stestr testscenarios testresources
    ddt requests-mock wsgi-intercept python-barbicanclient osprofiler
    pytest pytest-timeout
)

log() { echo "install-nova-env: $*"; }

# The stamp covers the pins and vtpcm's own install_requires.
key=$(cat "$CONSTRAINTS" setup.cfg | sha256sum | cut -c1-16)
stamp="$VENV/.vtpcm-nova-env-$key"

# Where Nova's config fixture looks for api-paste.ini:
# nova/tests/fixtures/conf.py sets [wsgi] api_paste_config to
# $state_path/etc/nova/api-paste.ini, state_path defaults to $pybasedir, and
# pybasedir is the directory that contains the `nova` package (site-packages).
pybasedir() {
    "$VENV/bin/python" -c 'import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec("nova").origin)))'
}

if [ -e "$stamp" ] && [ -x "$VENV/bin/python" ] \
        && [ -f "$(pybasedir 2>/dev/null || echo /nonexistent)/etc/nova/api-paste.ini" ]; then
    log "ready ($VENV)"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
if ! flock -w 1800 9; then
    log "another install holds $VENV.lock for 30 min; giving up" >&2
    exit 1
fi

if ! pkg-config --exists tss2-esys 2>/dev/null || ! command -v gcc >/dev/null; then
    log "warning: libtss2-dev/pkg-config/gcc missing; building tpm2-pytss will fail" \
        "unless pip has a cached wheel (run tools/install-deps.sh first)" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
        || { log "$PY is not Python 3.11" >&2; exit 1; }
    log "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
rm -f "$VENV"/.vtpcm-nova-env-*

# (This machine's pip config names file:// extra indexes that lack most
# projects: drop pip's per-project "Location ... is ignored" warnings.)
pip() {
    timeout "$PIP_TIMEOUT" "$VENV/bin/python" -m pip "$@" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

log "installing pip + Nova 34.0.0 test dependencies (pinned)"
pip install -q -c "$CONSTRAINTS" pip
pip install -q -c "$CONSTRAINTS" "${REQS[@]}"

# vtpcm itself, editable, without extras (its install_requires include
# tpm2-pytss==3.0.0, built from sdist against libtss2-dev). Building it right
# after install-deps.sh put the headers in place can race: retry a few times.
log "installing vtpcm (editable) into $VENV"
for attempt in 1 2 3 4 5; do
    if pip install -q -c "$CONSTRAINTS" -e "$ROOT"; then
        break
    fi
    if [ "$attempt" = 5 ]; then
        log "pip install -e $ROOT failed 5 times" >&2
        exit 1
    fi
    log "pip install -e failed (attempt $attempt); retrying in 30 s"
    sleep 30
done

# api-paste.ini etc.: the wheel installs its data files under
# $VENV/etc/nova; the config fixture wants them at <pybasedir>/etc/nova.
base=$(pybasedir)
[ -f "$VENV/etc/nova/api-paste.ini" ] \
    || { log "$VENV/etc/nova/api-paste.ini missing (nova wheel layout changed?)" >&2; exit 1; }
mkdir -p "$base/etc"
rm -rf "$base/etc/nova"
cp -r "$VENV/etc/nova" "$base/etc/nova"

# Smoke import in native-thread mode (what tests/nova_functional uses).
OS_NOVA_DISABLE_EVENTLET_PATCHING=1 timeout 300 "$VENV/bin/python" -c '
import nova.tests.functional.libvirt.base, nova.virt.libvirt.driver, vtpcm_common, sys
assert sys.modules.get("eventlet") is None, "eventlet got imported"
'

touch "$stamp"
log "ready ($VENV)"

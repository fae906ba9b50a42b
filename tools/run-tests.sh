#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what is missing,
# then runs lint + type checks + the layering check, unit, functional (real
# swtpm, tpm2-pytss, RabbitMQ, SQLite and PostgreSQL) and end-to-end tests
# (the two-host libvirt/QEMU lab; real Nova 34 services on it in
# tests/e2e_nova, from their own venv: tools/install-nova-services.sh), then
# the Nova functional tests in their own virtualenv (.venv-nova: Nova 34 and
# its test requirements, pinned in tools/nova-constraints.txt), then every
# benchmark once with tiny sizes (tools/bench.sh --smoke), so that they keep
# working. Extra arguments (-k, -x, ...) go to both main pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
# the real-Nova lab's services (tests/e2e_nova): Nova 34, placement, glance
tools/install-nova-services.sh
VENV=${VTPCM_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
echo "== lint"
ruff check vtpcm_common vtpcm_agent vtpcm_nova vtpcm_lab tests
python tools/check_test_raises.py tests benchmarks
echo "== types"
mypy
echo "== layering"
lint-imports
echo "== docs (warnings are errors)"
sphinx-build -E -W --keep-going -q -b html doc/source doc/build/html
# Two groups of tests run at once. The lab's (tests/e2e, tests/e2e_nova,
# tests/functional/libvirt_dac: libvirt, TCG guests, real Nova services)
# mostly wait on guests and daemons (load ~0.7 on the 2 cores when they ran
# alone), and nothing they start is shared with the other group: the lab has
# its own users, namespaces, uid ranges, lock and RabbitMQ topics, every
# functional deployment its own namespace. The benchmark smoke also uses the
# lab, so it runs after both. Each line is prefixed with its group;
# `grep '^\[lab\]'` reads one group alone.
LAB_TESTS=(tests/e2e tests/e2e_nova tests/functional/libvirt_dac)
NOVA_VENV=${VTPCM_NOVA_VENV:-$PWD/.venv-nova}
RUN_DIR=$(mktemp -d /tmp/vt-run.XXXXXX)  # short: tests make unix sockets below it
PYTEST=(python -m pytest -p no:cacheprovider -q --timeout=600)

lab_group() {
    echo "== $(date -u +%T) tests: the lab's"
    "${PYTEST[@]}" --basetemp="$RUN_DIR/lab" "${LAB_TESTS[@]}" "$@"
}

other_group() {
    echo "== $(date -u +%T) tests: unit and functional"
    "${PYTEST[@]}" --basetemp="$RUN_DIR/other" tests --ignore=tests/nova_functional \
        "${LAB_TESTS[@]/#/--ignore=}" "$@" || return
    echo "== $(date -u +%T) mutation smoke (agent sealing; fails under 90% of mutants" \
        "killed; tox -e mutation for all)"
    nice -n 19 tools/mutation.sh --smoke || return
    echo "== $(date -u +%T) nova functional (Nova 34's own harness, this driver and" \
        "filter, real agents)"
    tools/install-nova-env.sh || return
    "$NOVA_VENV/bin/python" -m pytest -p no:cacheprovider -q --timeout=600 \
        --basetemp="$RUN_DIR/nova" tests/nova_functional
}

group() {  # NAME FUNCTION ARGS...: its lines prefixed [NAME], its status in RUN_DIR/NAME.rc
    local name=$1
    shift
    set +e
    "$@" 2>&1 | sed -u "s/^/[$name] /"
    echo "${PIPESTATUS[0]}" >"$RUN_DIR/$name.rc"
}

group lab lab_group "$@" &
lab_pid=$!
group other other_group "$@" &
other_pid=$!
wait "$lab_pid" "$other_pid"
failed=()
for name in lab other; do
    rc=$(cat "$RUN_DIR/$name.rc" 2>/dev/null || echo missing)
    echo "== $(date -u +%T) group $name: exit status $rc"
    [ "$rc" = 0 ] || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (its lines above are prefixed [NAME])" >&2
    exit 1
fi
rm -rf "$RUN_DIR"
echo "== $(date -u +%T) benchmarks smoke (tiny sizes: fails if a benchmark crashes, never on its timings)"
tools/bench.sh --smoke

#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what is missing,
# then runs lint + type checks + the layering check, unit, functional (real
# swtpm, tpm2-pytss, RabbitMQ, SQLite and PostgreSQL) and end-to-end tests
# (the two-host libvirt/QEMU lab; real Nova 34 services on it in
# tests/e2e_nova, from their own venv: tools/install-nova-services.sh), then
# the Nova functional tests in their own virtualenv (.venv-nova: Nova 34 and
# its test requirements, pinned in tools/nova-constraints.txt), then every
# benchmark once with tiny sizes (tools/bench.sh --smoke), so that they keep
# working. Extra arguments (-k, -x, ...) go to the three main pytest runs
# (the groups below).
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do  # a path would run in every group at once, outside its own
    if [ -e "${arg%%::*}" ]; then
        echo "run-tests.sh: pass options only (-k, -x, ...), not paths ($arg): each" \
            "group would run it at once; run pytest on a path yourself" >&2
        exit 2
    fi
    case $arg in --basetemp*)  # each group has its own, and its watchdog finds it by it
        echo "run-tests.sh: --basetemp is set per group; leave it out" >&2
        exit 2 ;;
    esac
done
# Every pytest run of the groups ends by this many seconds after they start,
# whatever hangs (a test that pytest-timeout's signal cannot interrupt, an
# interpreter that never exits): SIGINT first, which tears the fixtures
# down and names the test it stopped in, SIGKILL two minutes later. With
# the installs before (~5 min) and the smokes after (~5 min) the whole run
# stays inside CI's 90 minutes even then.
GROUP_BOUND=${VTPCM_GROUP_BOUND:-3300}
if ! [[ $GROUP_BOUND =~ ^[1-9][0-9]*$ ]]; then
    echo "run-tests.sh: VTPCM_GROUP_BOUND must be a number of seconds, not '$GROUP_BOUND'" >&2
    exit 2
fi
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
# Three groups of tests run at once, each line of their output prefixed
# with its group (`grep '^\[lab\]'` reads one alone). Most tests wait on
# guests, daemons, RPC and swtpm: the whole suite in one process left the 2
# cores mostly idle (load average 0.3-1.2). Nothing one group starts is
# shared with another: the lab has its own users, namespaces, uid ranges,
# lock and RabbitMQ topics; every functional deployment its own namespace,
# directories and topics; the uid tests their own reserved uids, in one
# group. The benchmark smoke uses the lab too, so it
# runs after all three, and so does the mutation smoke (a mutant's test run
# that times out counts as killed).
#   lab:    the two-host lab, real Nova, privileged libvirtd; then Nova
#           functional
#   agents: tests/functional/agent, the fault matrix, the deployment check
#   rest:   everything else (tests/functional/engine, tests/unit, and any
#           new directory: nothing is left out by not being named)
LAB_TESTS=(tests/e2e tests/e2e_nova tests/functional/libvirt_dac)
AGENT_TESTS=(tests/functional/agent tests/functional/faults tests/functional/test_deploy.py)
NOVA_VENV=${VTPCM_NOVA_VENV:-$PWD/.venv-nova}
RUN_DIR=$(mktemp -d /tmp/vt-run.XXXXXX)  # short: tests make unix sockets below it
# after either venv's python. faulthandler_timeout: a test still running
# after 620 s gets every thread's stack printed, even when pytest-timeout's
# signal cannot land (a C call that retries EINTR: a TPM or libvirt call to
# a peer that stopped answering)
PYTEST_ARGS=(-m pytest -p no:cacheprovider -q --timeout=600 -o faulthandler_timeout=620
             --durations=15)
bounded() {  # COMMAND... (a pytest run with --basetemp=DIR): run it, stopped at the groups' deadline
    local left=$((DEADLINE - SECONDS)) arg mark=""
    if [ "$left" -le 0 ]; then
        echo "run-tests.sh: no time left for: $*" >&2
        return 124
    fi
    for arg in "$@"; do
        case $arg in --basetemp=*) mark=$arg ;; esac
    done
    if [ -z "$mark" ]; then
        echo "run-tests.sh: bounded needs the run's --basetemp=DIR: $*" >&2
        return 2
    fi
    # The watchdog finds the run by its --basetemp (a directory of this
    # run's own). Not coreutils timeout: it takes a Ctrl-C as well, sends it
    # on as a second SIGINT and SIGKILLs the teardown two minutes later. The
    # watchdog ignores Ctrl-C (sent to the whole process group); stopped
    # (TERM), it stops its sleep, which holds none of the group's output
    local pattern="(^| )${mark//./\\.}( |\$)"
    (
        trap '' INT
        nap() {
            sleep "$1" >/dev/null 2>&1 &
            sleeper=$!
            wait "$sleeper"
        }
        sleeper=""
        trap '[ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null; exit 0' TERM
        nap "$left"
        if pkill -INT -f -- "$pattern"; then
            echo "run-tests.sh: stopped after the groups' ${GROUP_BOUND}s bound: $*" >&2
            nap 120
            pkill -KILL -f -- "$pattern" &&
                echo "run-tests.sh: killed 120 s after the bound: $*" >&2
        fi
    ) &
    local watchdog=$! rc=0
    "$@" || rc=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    if [ "$SECONDS" -ge "$DEADLINE" ] && [ "$rc" = 0 ]; then
        rc=124  # stopped at the bound: whatever it said, it did not finish
    fi
    return "$rc"
}

nothing_selected() {  # pytest's 5 with options given (-k): that group had nothing to run
    [ "$1" = 5 ] && [ "$ARGS" -gt 0 ]
}

lab_group() {
    echo "== $(date -u +%T) tests: the lab's"
    local rc=0
    bounded python "${PYTEST_ARGS[@]}" --basetemp="$RUN_DIR/lab" "${LAB_TESTS[@]}" "$@" || rc=$?
    [ "$rc" = 0 ] || nothing_selected "$rc" || return "$rc"
    echo "== $(date -u +%T) nova functional (Nova 34's own harness, this driver and" \
        "filter, real agents)"
    bounded "$NOVA_VENV/bin/python" "${PYTEST_ARGS[@]}" --basetemp="$RUN_DIR/nova" \
        tests/nova_functional || return
    return "$rc"  # the lab's run says whether the options selected anything
}

agents_group() {
    echo "== $(date -u +%T) tests: agents, fault matrix"
    bounded python "${PYTEST_ARGS[@]}" --basetemp="$RUN_DIR/agents" "${AGENT_TESTS[@]}" "$@"
}

rest_group() {
    echo "== $(date -u +%T) tests: the rest (engine, unit)"
    bounded python "${PYTEST_ARGS[@]}" --basetemp="$RUN_DIR/rest" tests --ignore=tests/nova_functional \
        "${LAB_TESTS[@]/#/--ignore=}" "${AGENT_TESTS[@]/#/--ignore=}" "$@"
}

holders() {  # FIFO EXCEPT_PID: the pids of processes holding FIFO open, but EXCEPT_PID
    # every thread's fds: a process whose main thread ended shows none in /proc/PID/fd
    find /proc/[0-9]*/task/[0-9]*/fd -lname "$1" 2>/dev/null | cut -d/ -f3 | sort -u |
        grep -vx "$2"
}

group() {  # NAME FUNCTION ARGS...: its lines prefixed [NAME], its status in RUN_DIR/NAME.rc
    local name=$1
    shift
    local out="$RUN_DIR/$name.out" rc leaked pid
    mkfifo "$out"
    # sed ignores Ctrl-C: it must carry the teardown's output, and pytest
    # writing to a closed pipe would cut the teardown short
    (trap '' INT; exec sed -u "s/^/[$name] /" <"$out") &
    local reader=$!
    set +e
    "$@" >"$out" 2>&1
    rc=$?
    # A process the tests started and left behind, still holding the
    # group's output, keeps sed (and this run) waiting for its end: named,
    # stopped, and the group fails (each test stops what it starts by pid)
    leaked=$(holders "$out" "$reader")
    if [ -n "$leaked" ]; then
        for pid in $leaked; do
            echo "[$name] run-tests.sh: process $pid outlived the group's tests, holding" \
                "its output: $({ tr '\0' ' ' </proc/"$pid"/cmdline; } 2>/dev/null | cut -c1-300)" >&2
            kill -TERM "$pid" 2>/dev/null
        done
        sleep 5
        for pid in $(holders "$out" "$reader"); do
            kill -KILL "$pid" 2>/dev/null
        done
        [ "$rc" != 0 ] || rc=1
    fi
    # one that survives SIGKILL (D state) must not keep the run waiting
    # either; sed itself may take its time (a slow reader of this output)
    local waited=0
    while [ -n "$(holders "$out" "$reader")" ] && [ "$waited" -lt 150 ]; do  # 30 s
        sleep 0.2
        waited=$((waited + 1))
    done
    if [ -n "$(holders "$out" "$reader")" ]; then
        echo "[$name] run-tests.sh: the group's output is still held open after its" \
            "tests; not waiting for it" >&2
        kill -KILL "$reader" 2>/dev/null
        [ "$rc" != 0 ] || rc=1
    fi
    wait "$reader" 2>/dev/null
    echo "$rc" >"$RUN_DIR/$name.rc"
}

# before the groups: it may rewrite this tree's vtpcm.egg-info, which the
# other groups' daemons read their entry points from
echo "== $(date -u +%T) the Nova functional tests' virtualenv"
tools/install-nova-env.sh
ARGS=$#
DEADLINE=$((SECONDS + GROUP_BOUND))
export VTPCM_THREADGUARD=1  # tests/threadguard.py: lingering threads named, not waited for
GROUPS_RUN=(lab agents rest)
pids=()
# Ctrl-C reaches every group's pytest (one process group), which tears its
# fixtures down: wait for that (a second Ctrl-C stops waiting). A SIGTERM or
# SIGKILL of this script alone leaves the groups running, as it left pytest
# before.
trap 'echo "run-tests.sh: interrupted, waiting for the groups to tear down" >&2' INT
for name in "${GROUPS_RUN[@]}"; do
    group "$name" "${name}_group" "$@" &
    pids+=($!)
done
wait "${pids[@]}" || true  # each group's status is in its .rc file (an INT ends this wait)
wait "${pids[@]}" 2>/dev/null || true
trap - INT
unset VTPCM_THREADGUARD  # not in the smokes: mutmut runs pytest inside itself
failed=()
empty=0
for name in "${GROUPS_RUN[@]}"; do
    rc=$(cat "$RUN_DIR/$name.rc" 2>/dev/null || echo missing)
    echo "== $(date -u +%T) group $name: exit status $rc"
    if nothing_selected "$rc"; then
        empty=$((empty + 1))
    elif [ "$rc" != 0 ]; then
        failed+=("$name")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (their lines above are prefixed [NAME])" >&2
    exit 1
fi
if [ "$empty" = ${#GROUPS_RUN[@]} ]; then
    echo "FAILED: no group selected a test with the options given ($*)" >&2
    exit 1
fi
rm -rf "$RUN_DIR"
# after the groups: a mutant's test run that times out counts as killed, so
# it must not share the cores with them
echo "== $(date -u +%T) mutation smoke (agent sealing; fails under 90% of mutants killed;" \
    "tox -e mutation for all)"
nice -n 19 tools/mutation.sh --smoke
echo "== $(date -u +%T) benchmarks smoke (tiny sizes: fails if a benchmark crashes, never on its timings)"
tools/bench.sh --smoke

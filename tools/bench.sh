#!/usr/bin/env bash
# Runs the benchmarks (all, or the named ones), each writing
# benchmarks/results/<name>.json and benchmarks/results/<name>.png.
#
# Usage: tools/bench.sh [--smoke] [NAME...]
#        tools/bench.sh --list
#   NAME     filter       VTPCMFilter cost per host / per request   (.venv-nova)
#            nova-lm      what the vTPCM adds to a Nova live migration (.venv-nova)
#            attestation  EngineAPI.attest round trip, verify_quote/s  (.venv)
#            unsigned-flood  begin+abort latency while the unsigned endpoints
#                         are flooded, vs quiet (.venv; JSON only, no plot)
#            protocol     check/begin/commit/abort through engine, agents,
#                         swtpm, RabbitMQ; per-step spans; floors (.venv)
#            attestation-scale  attest_all over 10-1,000 hosts, SQLite and
#                         PostgreSQL, real swtpm quotes (.venv)
#            lab-lm       live migration in the two-host lab: no TPM vs libvirt's
#                         swtpm vs vTPCM (.venv, root; takes the lab lock per chunk)
#            agent-scale  200 vTPCMs on one agent: creation, memory, restart (.venv)
#            nova-real    live migration on real Nova 34 services (the real-Nova
#                         lab): vtpcm.small vs plain, interleaved, with the phases
#                         from the logs (.venv, root, the lab lock; not in --smoke:
#                         the lab's start alone takes ~1.5 min)
#   --smoke  tiny sizes, seconds each (nova-lm: ~45 s, the Nova harness's floor;
#            lab-lm: 1 round at 256 MiB, ~60 s, the lab's start/stop floor);
#            results go to benchmarks/results/smoke/ (git-ignored), never over
#            the committed full results.
#
# Environment: VTPCM_VENV, VTPCM_NOVA_VENV (default .venv, .venv-nova),
#              VTPCM_BENCH_ROUNDS (nova-lm rounds, default 10),
#              VTPCM_BENCH_HOPS (nova-real hops of each server, default 6).
# Needs RabbitMQ (nova-lm, attestation) like the functional tests; matplotlib is
# pip-installed into a benchmark's venv when missing (the Nova venv's install
# is pinned by tools/nova-constraints.txt so no pinned package moves).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# the lab (vtpcm_lab) is not in the installed package: benchmarks import it
# from the checkout, as the tests do
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
VENV=${VTPCM_VENV:-$ROOT/.venv}
NOVA_VENV=${VTPCM_NOVA_VENV:-$ROOT/.venv-nova}
ALL=(filter nova-lm attestation unsigned-flood protocol attestation-scale lab-lm agent-scale
     nova-real)

smoke=0
names=()
for arg in "$@"; do
    case $arg in
        --smoke) smoke=1 ;;
        --list) printf '%s\n' "${ALL[@]}"; exit 0 ;;
        -h|--help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "bench.sh: unknown option $arg" >&2; exit 2 ;;
        *) names+=("$arg") ;;
    esac
done
[ ${#names[@]} -gt 0 ] || names=("${ALL[@]}")
for name in "${names[@]}"; do
    case " ${ALL[*]} " in
        *" $name "*) ;;
        *) echo "bench.sh: unknown benchmark '$name' (have: ${ALL[*]})" >&2; exit 2 ;;
    esac
done

if [ $smoke = 1 ]; then
    OUT=$ROOT/benchmarks/results/smoke
    SMOKE_ARG=(--smoke)
else
    OUT=$ROOT/benchmarks/results
    SMOKE_ARG=()
fi
mkdir -p "$OUT"

log() { echo "bench.sh [$(date +%H:%M:%S)]: $*"; }

has_matplotlib() { "$1/bin/python" -c 'import matplotlib' >/dev/null 2>&1; }

ensure_matplotlib() {  # venv [constraints]
    has_matplotlib "$1" && return 0
    log "installing matplotlib into $1"
    if [ -n "${2:-}" ]; then
        timeout 900 "$1/bin/python" -m pip install -q -c "$2" matplotlib
    else
        timeout 900 "$1/bin/python" -m pip install -q matplotlib
    fi
}

ensure_nova_venv() {
    if [ -z "${VTPCM_NOVA_VENV:-}" ]; then
        tools/install-nova-env.sh || return  # idempotent, ~1 s when done
    fi
    ensure_matplotlib "$NOVA_VENV" "$ROOT/tools/nova-constraints.txt"
}

plot_with_matplotlib() {  # script json: in whichever venv has (or gets) matplotlib
    local plot_venv=$VENV
    if ! has_matplotlib "$VENV" && [ -x "$NOVA_VENV/bin/python" ] \
            && has_matplotlib "$NOVA_VENV"; then
        plot_venv=$NOVA_VENV
    fi
    ensure_matplotlib "$plot_venv" || return
    "$plot_venv/bin/python" "$1" "$2"
}

# (these run as `if run_x`, where set -e is off: every step returns on failure)
run_filter() {
    ensure_nova_venv || return
    local limit=900
    [ $smoke = 1 ] && limit=120
    timeout --kill-after=10 $limit "$NOVA_VENV/bin/python" benchmarks/filter_cost.py \
        "${SMOKE_ARG[@]}" --out-dir "$OUT"
}

run_nova_lm() {
    ensure_nova_venv || return
    # ~3 min on a quiet machine; a loaded one (other test runs) can take 5x
    local limit=1800
    [ $smoke = 1 ] && limit=240
    # -s: the benchmark's progress lines go straight to the terminal
    VTPCM_BENCH_SMOKE=$smoke VTPCM_BENCH_OUT_DIR=$OUT \
        timeout --kill-after=20 $((limit + 60)) "$NOVA_VENV/bin/python" -m pytest -q -s \
        -p no:cacheprovider --timeout=$limit -W ignore::DeprecationWarning \
        benchmarks/nova_harness
}

run_attestation() {
    local n=200 limit=600 plot_venv=$VENV
    [ $smoke = 1 ] && n=5 && limit=120
    timeout --kill-after=20 $limit "$VENV/bin/python" benchmarks/attestation_rtt.py \
        -n $n --out "$OUT/attestation.json" >/dev/null || return
    # plotting needs only matplotlib: use the Nova venv's if the project venv lacks it
    if ! has_matplotlib "$VENV" && [ -x "$NOVA_VENV/bin/python" ] \
            && has_matplotlib "$NOVA_VENV"; then
        plot_venv=$NOVA_VENV
    fi
    ensure_matplotlib "$plot_venv" || return
    "$plot_venv/bin/python" benchmarks/plot_attestation.py "$OUT/attestation.json" \
        "${SMOKE_ARG[@]}"
}

run_unsigned_flood() {
    local limit=900
    [ $smoke = 1 ] && limit=240
    timeout --kill-after=20 $limit "$VENV/bin/python" benchmarks/unsigned_flood.py \
        "${SMOKE_ARG[@]}" --out-dir "$OUT"
}

run_protocol() {
    local limit=1500
    [ $smoke = 1 ] && limit=300
    ensure_matplotlib "$VENV" || return  # it plots in-process
    timeout --kill-after=20 $limit "$VENV/bin/python" benchmarks/protocol.py \
        "${SMOKE_ARG[@]}" --out-dir "$OUT"
}

run_attestation_scale() {
    local limit=1800
    [ $smoke = 1 ] && limit=300
    ensure_matplotlib "$VENV" || return  # it plots in-process
    (cd benchmarks && timeout --kill-after=20 $limit "$VENV/bin/python" \
        attestation_scale.py "${SMOKE_ARG[@]}" --out-dir "$OUT")
}

run_lab_lm() {
    # full: 3 settings x (20 rounds + warm-up) x 3 arms, ~20 min on a quiet lab,
    # plus waits for the lab lock (it is taken per chunk of <= 9 min)
    local limit=5400
    [ $smoke = 1 ] && limit=600
    timeout --kill-after=30 $limit "$VENV/bin/python" benchmarks/lab_lm.py \
        "${SMOKE_ARG[@]}" --out-dir "$OUT" || return
    plot_with_matplotlib benchmarks/plot_lab_lm.py "$OUT/lab-lm.json"
}

run_agent_scale() {
    local limit=1800
    [ $smoke = 1 ] && limit=180
    timeout --kill-after=30 $limit "$VENV/bin/python" benchmarks/agent_scale.py \
        "${SMOKE_ARG[@]}" --out-dir "$OUT" || return
    plot_with_matplotlib benchmarks/plot_agent_scale.py "$OUT/agent-scale.json"
}

run_nova_real() {
    if [ $smoke = 1 ]; then
        log "nova-real has no smoke variant (the real-Nova lab's start alone takes ~1.5 min)"
        return 0
    fi
    # ~1.5 min lab start + 2 x VTPCM_BENCH_HOPS (default 6) migrations of ~6 s,
    # plus waits for the lab lock
    tools/install-nova-services.sh || return
    timeout --kill-after=30 3600 "$VENV/bin/python" benchmarks/nova_real_lm.py \
        --hops "${VTPCM_BENCH_HOPS:-6}" --out-dir "$OUT" || return
    plot_with_matplotlib benchmarks/plot_nova_real_lm.py "$OUT/nova-real-lm.json"
}

failed=()
for name in "${names[@]}"; do
    log "== $name$([ $smoke = 1 ] && echo ' (smoke)') -> $OUT/$name.{json,png}"
    start=$SECONDS
    case $name in
        filter) fn=run_filter ;;
        nova-lm) fn=run_nova_lm ;;
        attestation) fn=run_attestation ;;
        unsigned-flood) fn=run_unsigned_flood ;;
        protocol) fn=run_protocol ;;
        attestation-scale) fn=run_attestation_scale ;;
        lab-lm) fn=run_lab_lm ;;
        agent-scale) fn=run_agent_scale ;;
        nova-real) fn=run_nova_real ;;
    esac
    if $fn; then
        log "== $name done in $((SECONDS - start)) s"
    else
        log "== $name FAILED (exit $?) after $((SECONDS - start)) s"
        failed+=("$name")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    log "failed: ${failed[*]}"
    exit 1
fi
log "results in $OUT"

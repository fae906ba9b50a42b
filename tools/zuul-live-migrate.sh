#!/usr/bin/env bash
# Boot a server with the vTPCM flavor on a two-node DevStack and live-migrate
# it to the other compute host; then delete it and check that its vTPCM was
# destroyed. Run on the controller as the DevStack user after both nodes are
# stacked (the vtpcm-devstack-multinode Zuul job does, see .zuul.yaml).
#
# Before booting it makes every nova-compute host TRUSTED: enrolled (enroll
# if missing), APPROVED, assigned one golden policy recorded from the first
# host (PCRs 0-7; with the swtpm host-TPM stand-in they are all zero on every
# host, so one policy fits all), attested.
#
# Environment (defaults in brackets):
#   OS_CLOUD [devstack-admin]       admin credentials (clouds.yaml)
#   VTPCM_FLAVOR_NAME [vtpcm.small] the plugin's sample flavor
#   VTPCM_LM_IMAGE [first active image named cirros*]
#   VTPCM_LM_NETWORK [private]      DevStack's tenant network
#   VTPCM_LM_TIMEOUT [600]          seconds per wait
#   VTPCM_LM_POLICY [devstack-golden]
#   VTPCM_MANAGE [/opt/stack/data/venv/bin/vtpcm-manage, else from PATH]
# Exit status: 0 if the server moved to the other host and its vTPCM moved
# with it, 1 otherwise (the reason on stderr).
set -euo pipefail

export OS_CLOUD=${OS_CLOUD:-devstack-admin}
# 2.25+: block_migration=auto (no shared storage in DevStack).
export OS_COMPUTE_API_VERSION=${OS_COMPUTE_API_VERSION:-2.86}
FLAVOR=${VTPCM_FLAVOR_NAME:-vtpcm.small}
IMAGE=${VTPCM_LM_IMAGE:-}
NETWORK=${VTPCM_LM_NETWORK:-private}
TIMEOUT=${VTPCM_LM_TIMEOUT:-600}
POLICY=${VTPCM_LM_POLICY:-devstack-golden}
SERVER=vtpcm-lm-$$
MANAGE=${VTPCM_MANAGE:-/opt/stack/data/venv/bin/vtpcm-manage}
if [[ ! -x "$MANAGE" ]]; then
    MANAGE=$(command -v vtpcm-manage || true)
fi

log() { echo "zuul-live-migrate: $*" >&2; }
fail() {
    log "FAILED: $*"
    exit 1
}

[[ -n "$MANAGE" ]] || fail "no vtpcm-manage (set VTPCM_MANAGE)"

# host_status HOST - the engine's enrollment status of HOST ("" if unknown)
host_status() {
    "$MANAGE" --format json hosts show "$1" 2>/dev/null \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])' || true
}

# server_field FIELD - one field of the server
server_field() {
    openstack server show "$SERVER" -f value -c "$1"
}

# wait_status STATUS - until the server has STATUS; fail on ERROR or timeout
wait_status() {
    local want=$1 status="" deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        status=$(server_field status)
        if [[ "$status" == "$want" ]]; then
            return 0
        fi
        if [[ "$status" == "ERROR" ]]; then
            fail "server $SERVER is in ERROR: $(server_field fault || true)"
        fi
        sleep 5
    done
    fail "server $SERVER not $want after ${TIMEOUT}s (status $status)"
}

# vtpcm_field FIELD - a field of the server's vTPCM record in the engine
vtpcm_field() {
    "$MANAGE" --format json vtpcm show "$1" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$2"
}

cleanup() {
    if openstack server show "$SERVER" >/dev/null 2>&1; then
        log "deleting $SERVER"
        openstack server delete --wait "$SERVER" || log "could not delete $SERVER"
    fi
}
trap cleanup EXIT

# --- make the compute hosts TRUSTED --------------------------------------------
mapfile -t HOSTS < <(openstack compute service list --service nova-compute -f value -c Host | sort -u)
((${#HOSTS[@]} >= 2)) || fail "need two nova-compute hosts, found: ${HOSTS[*]:-none}"
log "compute hosts: ${HOSTS[*]}"
for host in "${HOSTS[@]}"; do
    status=$(host_status "$host")
    if [[ -z "$status" ]]; then
        log "enrolling $host"
        "$MANAGE" hosts enroll "$host"
        status=$(host_status "$host")
    fi
    case "$status" in
        APPROVED) ;;
        PENDING) "$MANAGE" hosts approve "$host" ;;
        *) fail "host $host is '${status:-not enrolled}' in the engine" ;;
    esac
done
policies=$("$MANAGE" --format json policies list)
if [[ "$policies" != *"\"$POLICY\""* ]]; then
    "$MANAGE" policies record "$POLICY" --from-host "${HOSTS[0]}" --pcrs 0,1,2,3,4,5,6,7 \
        --description "zuul-live-migrate: PCRs 0-7 of ${HOSTS[0]}"
fi
for host in "${HOSTS[@]}"; do
    "$MANAGE" hosts assign-policy "$host" "$POLICY"
done
"$MANAGE" hosts attest "${HOSTS[@]}" || fail "not every compute host is TRUSTED"

# --- boot ---------------------------------------------------------------------
if [[ -z "$IMAGE" ]]; then
    IMAGE=$(openstack image list --status active -f value -c Name | grep -m1 '^cirros' || true)
fi
[[ -n "$IMAGE" ]] || fail "no cirros image (set VTPCM_LM_IMAGE)"
properties=$(openstack flavor show "$FLAVOR" -f value -c properties)
[[ "$properties" == *"vtpcm:enabled"* ]] || fail "flavor $FLAVOR has no vtpcm:enabled property ($properties)"
log "booting $SERVER ($FLAVOR, $IMAGE, $NETWORK)"
openstack server create --flavor "$FLAVOR" --image "$IMAGE" --network "$NETWORK" "$SERVER" >/dev/null
wait_status ACTIVE
UUID=$(server_field id)
SOURCE=$(server_field OS-EXT-SRV-ATTR:host)
log "$SERVER ($UUID) is ACTIVE on $SOURCE"
[[ "$(vtpcm_field "$UUID" host)" == "$SOURCE" ]] || fail "the vTPCM of $UUID is not on $SOURCE"
GENERATION=$(vtpcm_field "$UUID" generation)

# --- live-migrate ---------------------------------------------------------------
log "live-migrating $SERVER away from $SOURCE"
openstack server migrate --live-migration "$SERVER"
deadline=$((SECONDS + TIMEOUT))
while :; do
    status=$(server_field status)
    DEST=$(server_field OS-EXT-SRV-ATTR:host)
    if [[ "$status" == "ACTIVE" && "$DEST" != "$SOURCE" ]]; then
        break
    fi
    if [[ "$status" == "ERROR" ]]; then
        fail "server $SERVER went to ERROR: $(server_field fault || true)"
    fi
    # A refused destination (not TRUSTED) leaves the server ACTIVE on its
    # source and the migration in error.
    migrations=$(openstack server migration list --server "$SERVER" -f value -c Status || true)
    if [[ "$migrations" =~ (error|failed|cancelled) ]]; then
        fail "the live migration of $SERVER failed (migration: $migrations; server $status on $DEST); see the instance actions and the nova-conductor and vtpcm-engine logs"
    fi
    ((SECONDS < deadline)) || fail "$SERVER still $status on $DEST after ${TIMEOUT}s"
    sleep 5
done
log "$SERVER is ACTIVE on $DEST"
[[ "$(vtpcm_field "$UUID" host)" == "$DEST" ]] || fail "the vTPCM of $UUID did not move to $DEST"
NEW_GENERATION=$(vtpcm_field "$UUID" generation)
((NEW_GENERATION > GENERATION)) || fail "the vTPCM generation did not advance ($GENERATION -> $NEW_GENERATION)"

# --- delete: the vTPCM is destroyed with the server --------------------------------
openstack server delete --wait "$SERVER"
deadline=$((SECONDS + 120))
while :; do
    rc=0
    "$MANAGE" vtpcm show "$UUID" >/dev/null 2>&1 || rc=$?
    if ((rc == 3)); then  # not found: destroyed
        break
    fi
    ((SECONDS < deadline)) || fail "the vTPCM of $UUID is still there after the server was deleted (vtpcm-manage vtpcm show: exit $rc)"
    sleep 3
done
log "OK: $SERVER moved $SOURCE -> $DEST with its vTPCM (generation $GENERATION -> $NEW_GENERATION), and its vTPCM was destroyed on delete"

#!/bin/bash
# plugin.sh - DevStack plugin of vtpcm.
#
# Compute node (service vtpcm-agent): installs swtpm, swtpm-tools, libtss2-dev
# and the vtpcm package, writes $VTPCM_AGENT_CONF and runs vtpcm-agent (as
# root: it chowns the swtpm control sockets to the QEMU user and opens the host
# TPM). Without a host TPM device it runs a swtpm stand-in (vtpcm-hosttpm).
# Controller (service vtpcm-engine): writes $VTPCM_ENGINE_CONF with DevStack's
# database and the DevStack user's operator key ($VTPCM_OPERATOR_KEY, made
# here) and runs vtpcm-engine.
#
# Not configured here because it does not exist yet: the Nova libvirt driver
# subclass (compute_driver) and the VTPCMFilter scheduler filter. Nova itself
# is left untouched.

# Save trace setting
_XTRACE_VTPCM=$(set +o | grep xtrace)
set -o xtrace

# True when this compute node uses the swtpm stand-in instead of a TPM device.
function vtpcm_uses_standin {
    case "$VTPCM_HOST_TPM" in
        swtpm) return 0 ;;
        device) return 1 ;;
        auto) [[ ! -c "$VTPCM_HOST_TPM_DEVICE" ]] ;;
        *) die $LINENO "VTPCM_HOST_TPM must be auto, device or swtpm, not '$VTPCM_HOST_TPM'" ;;
    esac
}

# The stand-in is a service of its own so that run_process/stop_process
# manage it; enable it on every plugin.sh run (stack, unstack, clean).
if is_service_enabled vtpcm-agent && vtpcm_uses_standin; then
    enable_service vtpcm-hosttpm
fi

# install_vtpcm - Debian packages and the vtpcm package (pip -e, DevStack venv)
function install_vtpcm {
    # tpm2-pytss (agent and engine) builds against tpm2-tss.
    install_package libtss2-dev pkg-config gcc python3-dev
    if is_service_enabled vtpcm-agent; then
        install_package swtpm swtpm-tools
    fi
    setup_develop "$VTPCM_DIR"
}

# vtpcm_socket_user - the QEMU user that must reach the control sockets
function vtpcm_socket_user {
    local user
    if [[ -n "$VTPCM_SOCKET_USER" ]]; then
        echo "$VTPCM_SOCKET_USER"
        return
    fi
    for user in libvirt-qemu qemu; do
        if getent passwd "$user" >/dev/null; then
            echo "$user"
            return
        fi
    done
}

# vtpcm_new_conf FILE - an empty config file readable by the stack user only
# (it will hold the broker password, and for the engine the database's).
function vtpcm_new_conf {
    local file=$1
    sudo install -d -o "$STACK_USER" -m 0755 "$VTPCM_CONF_DIR"
    rm -f "$file"
    install -m 0600 /dev/null "$file"
}

# configure_vtpcm_agent - write $VTPCM_AGENT_CONF
function configure_vtpcm_agent {
    local conf=$VTPCM_AGENT_CONF
    local socket_user
    vtpcm_new_conf "$conf"
    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    iniset "$conf" DEFAULT host "$(hostname)"
    iniset_rpc_backend vtpcm "$conf" DEFAULT
    iniset "$conf" agent state_dir "$VTPCM_STATE_DIR"
    iniset "$conf" agent run_dir "$VTPCM_RUN_DIR"
    socket_user=$(vtpcm_socket_user)
    if [[ -n "$socket_user" ]]; then
        iniset "$conf" agent socket_user "$socket_user"
    else
        warn $LINENO "vtpcm: no QEMU user found (set VTPCM_SOCKET_USER); control sockets stay owned by root"
    fi
    if vtpcm_uses_standin; then
        warn $LINENO "vtpcm: no host TPM at $VTPCM_HOST_TPM_DEVICE (VTPCM_HOST_TPM=$VTPCM_HOST_TPM): using a swtpm STAND-IN at $VTPCM_HOSTTPM_SOCKET. Host attestation then proves nothing about this machine; development and CI only."
        iniset "$conf" host_tpm tcti "swtpm:path=$VTPCM_HOSTTPM_SOCKET"
    else
        if [[ ! -c "$VTPCM_HOST_TPM_DEVICE" ]]; then
            die $LINENO "vtpcm: VTPCM_HOST_TPM=device but $VTPCM_HOST_TPM_DEVICE is not a character device"
        fi
        iniset "$conf" host_tpm tcti "device:$VTPCM_HOST_TPM_DEVICE"
    fi
    iniset "$conf" keystore host_key_mode tpm
    iniset "$conf" agent engine_public_key "$VTPCM_ENGINE_PUBLIC_KEY"
}

# configure_vtpcm_engine - write $VTPCM_ENGINE_CONF (DevStack's database)
function configure_vtpcm_engine {
    local conf=$VTPCM_ENGINE_CONF
    vtpcm_new_conf "$conf"
    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    iniset_rpc_backend vtpcm "$conf" DEFAULT
    iniset "$conf" engine host "$(hostname)"
    iniset "$conf" engine connection "$(database_connection_url "$VTPCM_DB_NAME")"
    iniset "$conf" engine command_signing_key "$VTPCM_SIGNING_KEY"
    # Created now (not at the engine's first start) so that an all-in-one
    # agent configured next finds the public key.
    sudo install -d -m 0700 "$(dirname "$VTPCM_SIGNING_KEY")"
    local py
    py="$(get_python_exec_prefix)/python3"
    [[ -x "$py" ]] || py=${PYTHON:-python3}
    sudo "$py" -c \
        "import sys; from vtpcm_common.authn import load_or_create_signing_key as f; f(sys.argv[1])" \
        "$VTPCM_SIGNING_KEY"
    # The DevStack user's operator key (kept if it exists): the engine trusts
    # its public half for admin calls, vtpcm-manage signs with it.
    "$(get_python_exec_prefix)/vtpcm-manage" keys create "$VTPCM_OPERATOR_KEY"
    iniset "$conf" engine admin_public_keys "$VTPCM_ADMIN_PUBLIC_KEYS"
    iniset "$conf" manage admin_key "$VTPCM_OPERATOR_KEY"
    iniset "$conf" attestation auto_approve "$VTPCM_AUTO_APPROVE"
    iniset "$conf" attestation reboot_policy "$VTPCM_REBOOT_POLICY"
    if [[ -n "$VTPCM_DEFAULT_POLICY" ]]; then
        iniset "$conf" attestation default_policy "$VTPCM_DEFAULT_POLICY"
    fi
}

# init_vtpcm_engine - (re)create the engine database; tables are created by
# the engine at start.
function init_vtpcm_engine {
    # DATABASE_BACKENDS is a word list ("mysql postgresql").
    # shellcheck disable=SC2086
    if is_service_enabled $DATABASE_BACKENDS; then
        recreate_database "$VTPCM_DB_NAME"
    fi
}

# start_vtpcm_hosttpm - the swtpm standing in for the host TPM. Its state
# persists in $VTPCM_HOSTTPM_DIR; every start is a TPM reset (a "reboot").
function start_vtpcm_hosttpm {
    sudo install -d -m 0700 "$VTPCM_STATE_DIR"
    sudo install -d -m 0700 "$VTPCM_HOSTTPM_DIR" "$VTPCM_HOSTTPM_DIR/state"
    run_process vtpcm-hosttpm "$(command -v swtpm) socket --tpm2 \
--server type=unixio,path=$VTPCM_HOSTTPM_SOCKET \
--ctrl type=unixio,path=$VTPCM_HOSTTPM_SOCKET.ctrl \
--tpmstate dir=$VTPCM_HOSTTPM_DIR/state --flags startup-clear \
--log file=$VTPCM_HOSTTPM_DIR/swtpm.log,level=1" "" root
    local _
    for _ in $(seq 1 30); do
        if sudo test -S "$VTPCM_HOSTTPM_SOCKET.ctrl"; then
            return 0
        fi
        sleep 1
    done
    die $LINENO "vtpcm: the host TPM stand-in did not create $VTPCM_HOSTTPM_SOCKET.ctrl"
}

function start_vtpcm_engine {
    local bin _
    bin=$(get_python_exec_prefix)
    run_process vtpcm-engine "$bin/vtpcm-engine --config-file $VTPCM_ENGINE_CONF"
    # Wait until it answers on its topic: an agent's enrollment request (a
    # cast) sent before the engine's queue exists would be lost.
    for _ in $(seq 1 30); do
        if "$bin/vtpcm-manage" --config-file "$VTPCM_ENGINE_CONF" --timeout 5 \
                hosts list >/dev/null; then
            return 0
        fi
        sleep 2
    done
    die $LINENO "vtpcm: vtpcm-engine does not answer; see journalctl -u devstack@vtpcm-engine"
}

function start_vtpcm_agent {
    if ! sudo test -r "$VTPCM_ENGINE_PUBLIC_KEY"; then
        die $LINENO "vtpcm: no engine public key at $VTPCM_ENGINE_PUBLIC_KEY; copy ${VTPCM_SIGNING_KEY}.pub from the controller (VTPCM_ENGINE_PUBLIC_KEY)"
    fi
    run_process vtpcm-agent "$(get_python_exec_prefix)/vtpcm-agent --config-file $VTPCM_AGENT_CONF" "" root
}

# stop_vtpcm - stop the services. The guests' swtpm processes keep running
# (DevStack units use KillMode=process): a restarted agent re-adopts them.
function stop_vtpcm {
    stop_process vtpcm-agent
    stop_process vtpcm-hosttpm
    stop_process vtpcm-engine
}

# vtpcm_kill_swtpms - stop, by pid, every swtpm the agent started (pid files in
# $VTPCM_RUN_DIR, checked against /proc/PID/cmdline).
function vtpcm_kill_swtpms {
    local pidfile pid
    for pidfile in "$VTPCM_RUN_DIR"/*.pid; do
        [[ -e "$pidfile" ]] || continue
        pid=$(sudo cat "$pidfile")
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null \
                | grep -q "swtpm socket .*$VTPCM_RUN_DIR/"; then
            sudo kill "$pid" || true
        fi
    done
}

# clean_vtpcm - destroys every vTPCM on this node (state and wrapped keys)
function clean_vtpcm {
    vtpcm_kill_swtpms
    sudo rm -rf "$VTPCM_STATE_DIR" "$VTPCM_RUN_DIR"
    sudo rm -f "$VTPCM_AGENT_CONF" "$VTPCM_ENGINE_CONF"
}

if is_service_enabled vtpcm-agent vtpcm-engine; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        echo_summary "Installing vtpcm"
        install_vtpcm
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        echo_summary "Configuring vtpcm"
        if is_service_enabled vtpcm-engine; then
            configure_vtpcm_engine
            init_vtpcm_engine
        fi
        if is_service_enabled vtpcm-agent; then
            configure_vtpcm_agent
        fi
    elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
        echo_summary "Starting vtpcm"
        # The engine first: a starting agent asks it to enroll this host.
        if is_service_enabled vtpcm-engine; then
            start_vtpcm_engine
        fi
        if is_service_enabled vtpcm-hosttpm; then
            start_vtpcm_hosttpm
        fi
        if is_service_enabled vtpcm-agent; then
            start_vtpcm_agent
        fi
    fi

    if [[ "$1" == "unstack" ]]; then
        stop_vtpcm
    fi

    if [[ "$1" == "clean" ]]; then
        clean_vtpcm
    fi
fi

# Restore xtrace
$_XTRACE_VTPCM

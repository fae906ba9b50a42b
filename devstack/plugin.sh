#!/bin/bash
# plugin.sh - DevStack plugin of vtpcm.
#
# Compute node (service vtpcm-agent, with n-cpu): installs swtpm, swtpm-tools,
# libtss2-dev and the vtpcm package, writes $VTPCM_AGENT_CONF (with the host
# command key readable by nova-compute's group) and runs vtpcm-agent (as
# root: it chowns the swtpm control sockets to the QEMU user and opens the
# host TPM). Without a host TPM device it runs a swtpm stand-in
# (vtpcm-hosttpm). Nova: checks libvirt >= 9.0, installs the nova/virt/vtpcm
# shim into the Python nova runs from, and sets compute_driver and [vtpcm] in
# $NOVA_CONF (DevStack copies it into $NOVA_CPU_CONF when it starts n-cpu);
# adds AppArmor rules for QEMU and swtpm where AppArmor is on.
# Controller (service vtpcm-engine): writes $VTPCM_ENGINE_CONF with DevStack's
# database and the DevStack user's operator key ($VTPCM_OPERATOR_KEY, made
# here) and runs vtpcm-engine. Where n-sch runs: VTPCMFilter in
# [filter_scheduler] and [vtpcm] in $NOVA_CONF. Where n-api runs: the sample
# flavor $VTPCM_FLAVOR_NAME (vtpcm:enabled=true) and, with VTPCM_API_WITNESS,
# the vtpcm_witness filter in nova-api's paste pipelines and its key.
#
# stack.sh runs this with errexit and an ERR trap: a function or command that
# returns non-zero outside a condition ends the run. DevStack's warn returns
# the status it was called with, so never call it where $? may be non-zero
# (an else branch, after ||).

# Save trace setting
_XTRACE_VTPCM=$(set +o | grep xtrace)
set -o xtrace

VTPCM_AA_BEGIN="# vtpcm-devstack begin"
VTPCM_AA_END="# vtpcm-devstack end"

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

# vtpcm_nova_enabled - true unless VTPCM_CONFIGURE_NOVA=False
function vtpcm_nova_enabled {
    [[ "$VTPCM_CONFIGURE_NOVA" == "True" ]]
}

# vtpcm_is_compute - nova-compute runs here next to a vtpcm-agent
function vtpcm_is_compute {
    vtpcm_nova_enabled && is_service_enabled n-cpu && is_service_enabled vtpcm-agent
}

# vtpcm_is_api - nova-api runs here and signs witnesses of unshelve and delete
function vtpcm_is_api {
    vtpcm_nova_enabled && is_service_enabled n-api && [[ "$VTPCM_API_WITNESS" == "True" ]]
}

# vtpcm_is_scheduler - nova-scheduler runs here
function vtpcm_is_scheduler {
    vtpcm_nova_enabled && is_service_enabled n-sch
}

# install_vtpcm - Debian packages and the vtpcm package (pip -e, DevStack venv)
function install_vtpcm {
    # tpm2-pytss (agent and engine) builds against tpm2-tss.
    install_package libtss2-dev pkg-config gcc python3-dev
    if is_service_enabled vtpcm-agent; then
        install_package swtpm swtpm-tools
    fi
    setup_develop "$VTPCM_DIR"
}

# vtpcm_libvirt_version - the libvirt version of this node ("" if unknown)
function vtpcm_libvirt_version {
    if command -v virsh >/dev/null 2>&1; then
        virsh --version 2>/dev/null || true
    elif command -v libvirtd >/dev/null 2>&1; then
        libvirtd --version 2>/dev/null | awk '{print $NF}' || true
    fi
}

# vtpcm_check_libvirt - the driver gives guests libvirt's external TPM
# backend, which libvirt has since 9.0 (Debian 12, Ubuntu 24.04).
function vtpcm_check_libvirt {
    local version want_major want_minor major minor
    version=$(vtpcm_libvirt_version)
    want_major=${VTPCM_MIN_LIBVIRT_VERSION%%.*}
    want_minor=${VTPCM_MIN_LIBVIRT_VERSION#*.}
    want_minor=${want_minor%%.*}
    if [[ ! "$version" =~ ^([0-9]+)\.([0-9]+) ]]; then
        warn $LINENO "vtpcm: cannot tell the libvirt version (no virsh or libvirtd); vTPCM guests need libvirt >= $VTPCM_MIN_LIBVIRT_VERSION (external TPM backend)"
        return 0
    fi
    major=${BASH_REMATCH[1]}
    minor=${BASH_REMATCH[2]}
    if (( major < want_major || (major == want_major && minor < want_minor) )); then
        die $LINENO "vtpcm: libvirt $version is too old: the VTPCMLibvirtDriver needs libvirt >= $VTPCM_MIN_LIBVIRT_VERSION for <tpm><backend type='external'> (Debian 12 and Ubuntu 24.04 have it). Use such a distribution, or set VTPCM_CONFIGURE_NOVA=False to run the vTPCM daemons without the Nova driver."
    fi
}

# vtpcm_nova_python - the interpreter nova runs from
function vtpcm_nova_python {
    echo "${NOVA_BIN_DIR:-$(get_python_exec_prefix)}/python3"
}

# install_vtpcm_nova_shim - nova/virt/vtpcm, so that nova-compute can load
# compute_driver = vtpcm.VTPCMLibvirtDriver; warns when the Nova version is
# outside the driver's SUPPORTED_NOVA.
function install_vtpcm_nova_shim {
    local py prefix nova_version
    py=$(vtpcm_nova_python)
    prefix=$(get_python_exec_prefix)
    if [[ "$(dirname "$py")" != "$prefix" ]]; then
        die $LINENO "vtpcm: nova runs from $(dirname "$py") (USE_VENV=True?), but setup_develop installed vtpcm into $prefix; per-project virtualenvs are not supported by this plugin"
    fi
    if [[ ! -x "$py" ]]; then
        die $LINENO "vtpcm: no Python at $py to install the Nova shim with"
    fi
    nova_version=$("$py" -c 'import importlib.metadata as m; print(m.version("nova"))')
    if ! "$py" -c 'import sys, importlib.metadata as m
from packaging.specifiers import SpecifierSet
from vtpcm_nova.virt.driver import SUPPORTED_NOVA
sys.exit(m.version("nova") not in SpecifierSet(",".join(SUPPORTED_NOVA)))'; then
        warn $LINENO "vtpcm: Nova $nova_version is outside the driver's SUPPORTED_NOVA (vtpcm_nova/virt/driver.py); the driver overrides private Nova methods and may not work"
    fi
    "$VTPCM_DIR/tools/install-nova-shim.sh" "$py"
}

# remove_vtpcm_nova_shim - undo install_vtpcm_nova_shim (if Nova is still there)
function remove_vtpcm_nova_shim {
    local py virt_dir
    py=$(vtpcm_nova_python)
    if [[ ! -x "$py" ]]; then
        return 0
    fi
    if virt_dir=$("$py" -c 'import os, nova.virt; print(os.path.dirname(nova.virt.__file__))' 2>/dev/null); then
        if [[ -n "$virt_dir" && -d "$virt_dir/vtpcm" ]]; then
            rm -rf "${virt_dir:?}/vtpcm"
        fi
    fi
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

# vtpcm_host_command_key_group - the group nova-compute runs as
function vtpcm_host_command_key_group {
    if [[ -n "$VTPCM_HOST_COMMAND_KEY_GROUP" ]]; then
        echo "$VTPCM_HOST_COMMAND_KEY_GROUP"
    elif [[ -n "${LIBVIRT_GROUP:-}" ]]; then
        echo "$LIBVIRT_GROUP"
    else
        id -gn "$STACK_USER"
    fi
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
    local socket_user key_group key_dir
    vtpcm_new_conf "$conf"
    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    iniset "$conf" DEFAULT host "$(hostname)"
    iniset_rpc_backend vtpcm "$conf" DEFAULT
    iniset "$conf" DEFAULT control_exchange "$VTPCM_CONTROL_EXCHANGE"
    iniset "$conf" agent state_dir "$VTPCM_STATE_DIR"
    iniset "$conf" agent run_dir "$VTPCM_RUN_DIR"
    socket_user=$(vtpcm_socket_user)
    if [[ -z "$socket_user" ]]; then
        warn $LINENO "vtpcm: no QEMU user found (set VTPCM_SOCKET_USER); control sockets stay owned by root"
    else
        iniset "$conf" agent socket_user "$socket_user"
    fi
    iniset "$conf" agent swtpm_uid_range "$VTPCM_SWTPM_UID_RANGE"
    if vtpcm_uses_standin; then
        warn $LINENO "vtpcm: no host TPM at $VTPCM_HOST_TPM_DEVICE (VTPCM_HOST_TPM=$VTPCM_HOST_TPM): using a swtpm STAND-IN at $VTPCM_HOSTTPM_SOCKET. Host attestation then proves nothing about this machine; development and CI only."
        iniset "$conf" host_tpm tcti "swtpm:path=$VTPCM_HOSTTPM_SOCKET"
    else
        if [[ ! -c "$VTPCM_HOST_TPM_DEVICE" ]]; then
            die $LINENO "vtpcm: VTPCM_HOST_TPM=device but $VTPCM_HOST_TPM_DEVICE is not a character device"
        fi
        iniset "$conf" host_tpm tcti "device:$VTPCM_HOST_TPM_DEVICE"
    fi
    if [[ -n "$VTPCM_EK_CA_FILE" ]]; then
        iniset "$conf" host_tpm ek_ca_file "$VTPCM_EK_CA_FILE"
    elif ! vtpcm_uses_standin; then
        warn $LINENO "vtpcm: VTPCM_EK_CA_FILE is not set: the agent's first start trusts whatever answers at $VTPCM_HOST_TPM_DEVICE (set it to the TPM manufacturer's EK CA bundle)"
    fi
    iniset "$conf" keystore host_key_mode tpm
    iniset "$conf" agent engine_public_key "$VTPCM_ENGINE_PUBLIC_KEY"
    # The host command key: made by the agent (root) at its first start,
    # 0640 with nova-compute's group, in a directory nova-compute can enter.
    key_group=$(vtpcm_host_command_key_group)
    key_dir=$(dirname "$VTPCM_HOST_COMMAND_KEY")
    if ! getent group "$key_group" >/dev/null; then
        die $LINENO "vtpcm: no group '$key_group' for the host command key (VTPCM_HOST_COMMAND_KEY_GROUP)"
    fi
    if [[ "$key_dir" == "$VTPCM_STATE_DIR" ]]; then
        die $LINENO "vtpcm: VTPCM_HOST_COMMAND_KEY must not be in $VTPCM_STATE_DIR (root only): nova-compute could not read it"
    fi
    sudo install -d -o root -g "$key_group" -m 0750 "$key_dir"
    iniset "$conf" agent host_command_key "$VTPCM_HOST_COMMAND_KEY"
    iniset "$conf" agent host_command_key_group "$key_group"
}

# configure_vtpcm_engine - write $VTPCM_ENGINE_CONF (DevStack's database)
function configure_vtpcm_engine {
    local conf=$VTPCM_ENGINE_CONF
    local key_dir py
    vtpcm_new_conf "$conf"
    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    iniset_rpc_backend vtpcm "$conf" DEFAULT
    iniset "$conf" DEFAULT control_exchange "$VTPCM_CONTROL_EXCHANGE"
    iniset "$conf" engine host "$(hostname)"
    iniset "$conf" engine connection "$(database_connection_url "$VTPCM_DB_NAME")"
    iniset "$conf" engine command_signing_key "$VTPCM_SIGNING_KEY"
    # The engine runs as $STACK_USER: its key directory is the stack user's
    # (not the agent's root-only state directory). Created now (not at the
    # engine's first start) so that an all-in-one agent configured next finds
    # the public key. An existing key (the Zuul job makes one before
    # stacking) is kept.
    key_dir=$(dirname "$VTPCM_SIGNING_KEY")
    if [[ "$key_dir" == "$VTPCM_STATE_DIR" ]]; then
        die $LINENO "vtpcm: VTPCM_SIGNING_KEY must not be in the agent's state directory $VTPCM_STATE_DIR (root only; the engine runs as $STACK_USER)"
    fi
    sudo install -d -o "$STACK_USER" -m 0700 "$key_dir"
    py="$(get_python_exec_prefix)/python3"
    [[ -x "$py" ]] || py=${PYTHON:-python3}
    "$py" -c \
        "import sys; from vtpcm_common.authn import load_or_create_signing_key as f; f(sys.argv[1])" \
        "$VTPCM_SIGNING_KEY"
    # The DevStack user's operator key (kept if it exists): the engine trusts
    # its public half for admin calls, vtpcm-manage signs with it.
    "$(get_python_exec_prefix)/vtpcm-manage" keys create "$VTPCM_OPERATOR_KEY"
    iniset "$conf" engine admin_public_keys "$VTPCM_ADMIN_PUBLIC_KEYS"
    iniset "$conf" manage admin_key "$VTPCM_OPERATOR_KEY"
    iniset "$conf" attestation auto_approve "$VTPCM_AUTO_APPROVE"
    iniset "$conf" attestation reboot_policy "$VTPCM_REBOOT_POLICY"
    iniset "$conf" attestation require_certified_parents "$VTPCM_REQUIRE_CERTIFIED_PARENTS"
    if [[ -n "$VTPCM_DEFAULT_POLICY" ]]; then
        iniset "$conf" attestation default_policy "$VTPCM_DEFAULT_POLICY"
    fi
    # Nova's API, which the engine asks before an unshelve moves a shelved
    # vTPCM and before it reaps one: DevStack's nova service user (admin in
    # the service project), as Nova's own [placement] section is written.
    iniset "$conf" nova auth_type password
    iniset "$conf" nova auth_url "$KEYSTONE_SERVICE_URI"
    iniset "$conf" nova username nova
    iniset "$conf" nova password "$SERVICE_PASSWORD"
    iniset "$conf" nova user_domain_name "$SERVICE_DOMAIN_NAME"
    iniset "$conf" nova project_name "$SERVICE_PROJECT_NAME"
    iniset "$conf" nova project_domain_name "$SERVICE_DOMAIN_NAME"
    iniset "$conf" nova region_name "$REGION_NAME"
    # nova-api's witnesses: required, with the key made where n-api runs
    # (all-in-one and controller: here, now, so the engine starts with it)
    if [[ "$VTPCM_API_WITNESS" == "True" ]]; then
        if vtpcm_is_api; then
            vtpcm_make_api_witness_key
        fi
        iniset "$conf" nova require_api_witness True
        iniset "$conf" nova api_witness_public_keys "$VTPCM_API_WITNESS_PUBLIC_KEYS"
    else
        iniset "$conf" nova require_api_witness False
    fi
}

# vtpcm_make_api_witness_key - nova-api's witness key (kept if it exists),
# the stack user's: nova-api runs as $STACK_USER
function vtpcm_make_api_witness_key {
    sudo install -d -o "$STACK_USER" -m 0700 "$(dirname "$VTPCM_API_WITNESS_KEY")"
    "$(get_python_exec_prefix)/vtpcm-manage" keys create "$VTPCM_API_WITNESS_KEY"
}

# configure_vtpcm_nova_api - the vtpcm_witness filter right after
# keystonecontext in every nova-api pipeline that authenticates (the request
# it witnesses is the user's), its section, and its key in [vtpcm].
function configure_vtpcm_nova_api {
    local paste=${VTPCM_NOVA_API_PASTE_INI:-$(dirname "$NOVA_CONF")/api-paste.ini}
    if [[ ! -f "$paste" ]]; then
        die $LINENO "vtpcm: no nova-api paste config at $paste (VTPCM_NOVA_API_PASTE_INI)"
    fi
    vtpcm_make_api_witness_key
    sed -i -E '/^[^[#;].*=.*[[:space:]]keystonecontext([[:space:]]|$)/ {/vtpcm_witness/! s/([[:space:]])keystonecontext([[:space:]]|$)/\1keystonecontext vtpcm_witness\2/}' "$paste"
    if ! grep -q '^\[filter:vtpcm_witness\]' "$paste"; then
        printf '\n[filter:vtpcm_witness]\npaste.filter_factory = vtpcm_nova.api.witness:filter_factory\n' >> "$paste"
    fi
    iniset "$NOVA_CONF" vtpcm api_witness_key_file "$VTPCM_API_WITNESS_KEY"
}

# configure_vtpcm_nova_common - [vtpcm] of $NOVA_CONF: the vTPCM daemons'
# broker (the same iniset_rpc_backend call as theirs: RabbitMQ's default
# virtual host, not Nova's cell vhost) and exchange.
function configure_vtpcm_nova_common {
    iniset_rpc_backend vtpcm "$NOVA_CONF" vtpcm
    iniset "$NOVA_CONF" vtpcm control_exchange "$VTPCM_CONTROL_EXCHANGE"
}

# configure_vtpcm_nova_compute - the driver. $NOVA_CPU_CONF does not exist
# yet: DevStack makes it from $NOVA_CONF when it starts n-cpu, after this
# phase (then merges local.conf's [[post-config|$NOVA_CPU_CONF]]); the extra
# phase checks the result.
function configure_vtpcm_nova_compute {
    iniset "$NOVA_CONF" DEFAULT compute_driver "$VTPCM_NOVA_COMPUTE_DRIVER"
    iniset "$NOVA_CONF" vtpcm host_command_key "$VTPCM_HOST_COMMAND_KEY"
    iniset "$NOVA_CONF" vtpcm engine_public_key "$VTPCM_ENGINE_PUBLIC_KEY"
    iniset "$NOVA_CONF" vtpcm socket_dirs "$VTPCM_RUN_DIR"
    # Nova's default (reap) destroys a guest whose instance any compute can
    # mark deleted through nova-conductor, and the driver then shreds its vTPCM
    iniset "$NOVA_CONF" DEFAULT running_deleted_instance_action log
}

# configure_vtpcm_nova_scheduler - VTPCMFilter in [filter_scheduler]:
# available_filters is multi-valued (Nova's all_filters kept, ours added
# with iniadd), enabled_filters a list (ours appended).
function configure_vtpcm_nova_scheduler {
    local available enabled
    available=" $(iniget_multiline "$NOVA_CONF" filter_scheduler available_filters) "
    if [[ "$available" == "  " ]]; then
        iniset "$NOVA_CONF" filter_scheduler available_filters nova.scheduler.filters.all_filters
    fi
    if [[ "$available" != *" $VTPCM_SCHEDULER_FILTER "* ]]; then
        iniadd "$NOVA_CONF" filter_scheduler available_filters "$VTPCM_SCHEDULER_FILTER"
    fi
    enabled=$(iniget "$NOVA_CONF" filter_scheduler enabled_filters)
    enabled=${enabled:-$NOVA_FILTERS}
    if [[ ",$enabled," != *",${VTPCM_SCHEDULER_FILTER##*.},"* ]]; then
        iniset "$NOVA_CONF" filter_scheduler enabled_filters "${enabled:+$enabled,}${VTPCM_SCHEDULER_FILTER##*.}"
    fi
}

# vtpcm_check_nova_cpu_conf - after n-cpu started: it must run our driver
function vtpcm_check_nova_cpu_conf {
    local driver
    if [[ -z "${NOVA_CPU_CONF:-}" || ! -e "$NOVA_CPU_CONF" ]]; then
        return 0
    fi
    driver=$(iniget "$NOVA_CPU_CONF" DEFAULT compute_driver)
    if [[ "$driver" != "$VTPCM_NOVA_COMPUTE_DRIVER" ]]; then
        die $LINENO "vtpcm: $NOVA_CPU_CONF has compute_driver = '$driver', not $VTPCM_NOVA_COMPUTE_DRIVER (a local.conf [[post-config|\$NOVA_CPU_CONF]] override?); nova-compute would ignore vtpcm: flavors"
    fi
}

# vtpcm_apparmor_wanted - write the AppArmor rules on this node?
function vtpcm_apparmor_wanted {
    case "$VTPCM_APPARMOR" in
        [Tt]rue) return 0 ;;
        [Ff]alse) return 1 ;;
        auto)
            [[ -d "$VTPCM_APPARMOR_DIR" && -r /sys/module/apparmor/parameters/enabled ]] &&
                [[ "$(< /sys/module/apparmor/parameters/enabled)" == Y ]] ;;
        *) die $LINENO "VTPCM_APPARMOR must be auto, True or False, not '$VTPCM_APPARMOR'" ;;
    esac
}

# vtpcm_aa_drop_block FILE - remove the plugin's lines from FILE
function vtpcm_aa_drop_block {
    local file=$1
    if [[ -e "$file" ]]; then
        sudo sed -i "/^$VTPCM_AA_BEGIN\$/,/^$VTPCM_AA_END\$/d" "$file"
    fi
}

# vtpcm_aa_set_block FILE RULE... - (re)write the plugin's lines in FILE
function vtpcm_aa_set_block {
    local file=$1
    shift
    vtpcm_aa_drop_block "$file"
    sudo install -d -m 0755 "$(dirname "$file")"
    { echo "$VTPCM_AA_BEGIN"; printf '%s\n' "$@"; echo "$VTPCM_AA_END"; } \
        | sudo tee -a "$file" >/dev/null
}

# configure_vtpcm_apparmor - QEMU runs under a per-domain profile made by
# virt-aa-helper, which (libvirt 9.0) adds rules for libvirt's own swtpm
# only: allow connecting to the agent's control sockets through the
# libvirt-qemu abstraction's local include. Ubuntu confines swtpm itself
# (usr.bin.swtpm): allow the agent's directories and its unix sockets.
function configure_vtpcm_apparmor {
    local aa=$VTPCM_APPARMOR_DIR
    local qemu_abs=$VTPCM_APPARMOR_DIR/abstractions/libvirt-qemu
    if ! vtpcm_apparmor_wanted; then
        return 0
    fi
    local qemu_local=""
    if [[ -f "$qemu_abs" ]] && grep -q "abstractions/libvirt-qemu\.d" "$qemu_abs"; then
        qemu_local=$aa/abstractions/libvirt-qemu.d/vtpcm   # newer libvirt
    elif [[ -f "$qemu_abs" ]] && grep -q "local/abstractions/libvirt-qemu" "$qemu_abs"; then
        qemu_local=$aa/local/abstractions/libvirt-qemu     # e.g. Debian 12 (9.0)
    fi
    if [[ -z "$qemu_local" ]]; then
        warn $LINENO "vtpcm: no local include in $qemu_abs; if AppArmor confines QEMU, allow it \"$VTPCM_RUN_DIR/*.ctrl\" rw"
    else
        vtpcm_aa_set_block "$qemu_local" "  \"$VTPCM_RUN_DIR/*.ctrl\" rw,"
    fi
    if [[ -f "$aa/usr.bin.swtpm" ]]; then
        vtpcm_aa_set_block "$aa/local/usr.bin.swtpm" \
            "  \"$VTPCM_STATE_DIR/\" r," "  \"$VTPCM_STATE_DIR/**\" rwk," \
            "  \"$VTPCM_RUN_DIR/\" r," "  \"$VTPCM_RUN_DIR/**\" rwk," "  unix,"
        sudo apparmor_parser -r "$aa/usr.bin.swtpm"
    fi
}

# clean_vtpcm_apparmor - remove the rules configure_vtpcm_apparmor wrote
function clean_vtpcm_apparmor {
    local aa=$VTPCM_APPARMOR_DIR
    sudo rm -f "$aa/abstractions/libvirt-qemu.d/vtpcm"
    vtpcm_aa_drop_block "$aa/local/abstractions/libvirt-qemu"
    vtpcm_aa_drop_block "$aa/local/usr.bin.swtpm"
    if [[ -f "$aa/usr.bin.swtpm" ]] && command -v apparmor_parser >/dev/null 2>&1; then
        sudo apparmor_parser -r "$aa/usr.bin.swtpm" || true
    fi
}

# create_vtpcm_flavor - the sample flavor, unless it exists
function create_vtpcm_flavor {
    local props=(--property vtpcm:enabled=true)
    if openstack --os-region-name="$REGION_NAME" flavor show "$VTPCM_FLAVOR_NAME" >/dev/null 2>&1; then
        return 0
    fi
    if [[ -n "$VTPCM_FLAVOR_MODEL" ]]; then
        props+=(--property "vtpcm:model=$VTPCM_FLAVOR_MODEL")
    fi
    openstack --os-region-name="$REGION_NAME" flavor create \
        --ram "$VTPCM_FLAVOR_RAM" --disk "$VTPCM_FLAVOR_DISK" --vcpus "$VTPCM_FLAVOR_VCPUS" \
        "${props[@]}" "$VTPCM_FLAVOR_NAME"
}

# init_vtpcm_engine - (re)create the engine database and its schema
# (vtpcm-manage db sync, as nova-manage db sync: the engine refuses to
# start on a database that is not at its revision).
function init_vtpcm_engine {
    # DATABASE_BACKENDS is a word list ("mysql postgresql").
    # shellcheck disable=SC2086
    if is_service_enabled $DATABASE_BACKENDS; then
        recreate_database "$VTPCM_DB_NAME"
    fi
    "$(get_python_exec_prefix)/vtpcm-manage" --config-file "$VTPCM_ENGINE_CONF" db sync
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

# clean_vtpcm - destroys every vTPCM on this node (state and wrapped keys),
# the host command key, the engine's signing key and what Nova got from us
# (nova.conf itself is rewritten by the next stack.sh).
function clean_vtpcm {
    vtpcm_kill_swtpms
    sudo rm -rf "$VTPCM_STATE_DIR" "$VTPCM_RUN_DIR"
    sudo rm -f "$VTPCM_AGENT_CONF" "$VTPCM_ENGINE_CONF"
    if is_service_enabled vtpcm-agent; then
        sudo rm -rf "$(dirname "$VTPCM_HOST_COMMAND_KEY")"
    fi
    if is_service_enabled vtpcm-engine; then
        sudo rm -rf "$(dirname "$VTPCM_SIGNING_KEY")"
    fi
    if vtpcm_is_compute; then
        remove_vtpcm_nova_shim
        clean_vtpcm_apparmor
    fi
}

if is_service_enabled vtpcm-agent vtpcm-engine; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        echo_summary "Installing vtpcm"
        install_vtpcm
        if vtpcm_is_compute; then
            vtpcm_check_libvirt
            install_vtpcm_nova_shim
        fi
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        echo_summary "Configuring vtpcm"
        if is_service_enabled vtpcm-engine; then
            configure_vtpcm_engine
            init_vtpcm_engine
        fi
        if is_service_enabled vtpcm-agent; then
            configure_vtpcm_agent
        fi
        if vtpcm_is_compute || vtpcm_is_scheduler || vtpcm_is_api; then
            configure_vtpcm_nova_common
        fi
        if vtpcm_is_api; then
            configure_vtpcm_nova_api
        fi
        if vtpcm_is_compute; then
            configure_vtpcm_nova_compute
            configure_vtpcm_apparmor
        fi
        if vtpcm_is_scheduler; then
            configure_vtpcm_nova_scheduler
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
        if vtpcm_is_compute; then
            vtpcm_check_nova_cpu_conf
        fi
        if vtpcm_nova_enabled && is_service_enabled n-api && [[ "$VTPCM_CREATE_FLAVOR" == "True" ]]; then
            create_vtpcm_flavor
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

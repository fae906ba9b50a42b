# shellcheck shell=bash
# Stand-ins for the DevStack functions devstack/plugin.sh and devstack/settings
# call, for tests/unit/test_devstack_plugin.py. Every stub appends its call to
# $STUB_CALLS, one line per call: the name and the arguments, tab-separated.
# The ini functions also keep the options they set in $STUB_INI (lines of
# file<TAB>section<TAB>option<TAB>value, one per value of a multi-valued
# option) so that iniget answers like DevStack's would.
# Behaviour knobs: STUB_LIBVIRT_VERSION (virsh --version, default 9.0.0), STUB_FLAVOR_EXISTS
# (1: "openstack flavor show" finds it), STUB_NO_QEMU_USER (1: getent passwd
# finds no QEMU user), STUB_NO_GROUP (1: getent group fails).
# stack.sh runs the plugin with errexit and an ERR trap; the runner sets both.

: "${STUB_CALLS:?}" "${STUB_INI:?}"

_stub_record() {
    local IFS=$'\t'
    printf '%s\n' "$*" >> "$STUB_CALLS"
}

_stub_ini_drop() {
    awk -F'\t' -v f="$1" -v s="$2" -v o="$3" '!($1 == f && $2 == s && $3 == o)' \
        "$STUB_INI" > "$STUB_INI.new"
    mv "$STUB_INI.new" "$STUB_INI"
}

_stub_ini_put() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STUB_INI"
}

iniset() {
    if [[ "$1" == "-sudo" ]]; then shift; fi
    _stub_record iniset "$@"
    _stub_ini_drop "$1" "$2" "$3"
    _stub_ini_put "$1" "$2" "$3" "$4"
}

iniset_multiline() {
    if [[ "$1" == "-sudo" ]]; then shift; fi
    _stub_record iniset_multiline "$@"
    local file=$1 section=$2 option=$3 value
    shift 3
    _stub_ini_drop "$file" "$section" "$option"
    for value in "$@"; do
        _stub_ini_put "$file" "$section" "$option" "$value"
    done
}

# DevStack's iniadd appends values to a (multi-valued) option.
iniadd() {
    if [[ "$1" == "-sudo" ]]; then shift; fi
    _stub_record iniadd "$@"
    local file=$1 section=$2 option=$3 value
    shift 3
    for value in "$@"; do
        _stub_ini_put "$file" "$section" "$option" "$value"
    done
}

inidelete() {
    if [[ "$1" == "-sudo" ]]; then shift; fi
    _stub_record inidelete "$@"
    _stub_ini_drop "$1" "$2" "$3"
}

iniget() {
    _stub_record iniget "$@"
    awk -F'\t' -v f="$1" -v s="$2" -v o="$3" \
        '$1 == f && $2 == s && $3 == o { print $4; exit }' "$STUB_INI"
}

iniget_multiline() {
    _stub_record iniget_multiline "$@"
    awk -F'\t' -v f="$1" -v s="$2" -v o="$3" \
        '$1 == f && $2 == s && $3 == o { printf "%s%s", sep, $4; sep = " " } END { print "" }' \
        "$STUB_INI"
}

ini_has_option() {
    if [[ "$1" == "-sudo" ]]; then shift; fi
    [[ -n "$(awk -F'\t' -v f="$1" -v s="$2" -v o="$3" '$1 == f && $2 == s && $3 == o' "$STUB_INI")" ]]
}

# What DevStack does to $NOVA_CPU_CONF when it starts n-cpu (after the
# post-config phase): a copy of $NOVA_CONF. Not a DevStack function.
stub_start_nova_compute() {
    _stub_record stub_start_nova_compute
    awk -F'\t' -v f="$NOVA_CONF" -v t="$NOVA_CPU_CONF" 'BEGIN { OFS = "\t" }
        $1 == t { next } { print } $1 == f { $1 = t; print }' "$STUB_INI" > "$STUB_INI.new"
    mv "$STUB_INI.new" "$STUB_INI"
    : > "$NOVA_CPU_CONF"
}

iniset_rpc_backend() {
    _stub_record iniset_rpc_backend "$@"
    iniset "$2" "${3:-DEFAULT}" transport_url "$(get_transport_url "${4:-}")"
}

get_transport_url() {
    echo "rabbit://stackrabbit:secretrabbit@192.0.2.10:5672/${1:-}"
}

define_plugin() { _stub_record define_plugin "$@"; }
echo_summary() { _stub_record echo_summary "$@"; }
install_package() { _stub_record install_package "$@"; }
setup_develop() { _stub_record setup_develop "$@"; }
run_process() { _stub_record run_process "$@"; }
stop_process() { _stub_record stop_process "$@"; }
recreate_database() { _stub_record recreate_database "$@"; }
database_connection_url() { echo "mysql+pymysql://root:secret@127.0.0.1/$1?charset=utf8"; }
get_python_exec_prefix() { echo "$STUB_BIN"; }

# DevStack's warn returns the status it was called with (stack.sh's ERR trap
# then ends the run if that is not 0); die exits.
warn() {
    local rc=$?
    _stub_record warn "$@"
    return $rc
}

die() {
    _stub_record die "$@"
    echo "die: $*" >&2
    exit 1
}

trueorfalse() {
    local default=$1 value=${!2:-}
    case "$value" in
        1 | [yY]es | YES | [tT]rue | TRUE) echo True ;;
        0 | [nN]o | NO | [fF]alse | FALSE) echo False ;;
        *) echo "$default" ;;
    esac
}

is_service_enabled() {
    local service
    for service in "$@"; do
        if [[ ",$ENABLED_SERVICES," == *",$service,"* ]]; then
            return 0
        fi
    done
    return 1
}

enable_service() {
    _stub_record enable_service "$@"
    local service
    for service in "$@"; do
        if ! is_service_enabled "$service"; then
            ENABLED_SERVICES+=",$service"
        fi
    done
}

# Commands that would change this machine or need a cloud. "sudo tee" also
# records what it was given, one "tee-input<TAB>line" record per line.
sudo() {
    _stub_record sudo "$@"
    if [[ "$1" == "tee" ]]; then
        local line
        while IFS= read -r line; do
            _stub_record tee-input "$line"
        done
    fi
}

getent() {
    _stub_record getent "$@"
    case "$1" in
        passwd) [[ "${STUB_NO_QEMU_USER:-0}" != 1 ]] && echo "$2:x:64055:64055::/nonexistent:/usr/sbin/nologin" ;;
        group) [[ "${STUB_NO_GROUP:-0}" != 1 ]] && echo "$2:x:999:" ;;
        *) return 2 ;;
    esac
}

virsh() {
    _stub_record virsh "$@"
    echo "${STUB_LIBVIRT_VERSION-9.0.0}"
}

openstack() {
    _stub_record openstack "$@"
    if [[ " $* " == *" flavor show "* ]]; then
        [[ "${STUB_FLAVOR_EXISTS:-0}" == 1 ]]
    fi
}

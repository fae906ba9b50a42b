#!/bin/bash
# Per-domain DAC labels for QEMU with the vTPCM's external TPM: the
# experiment behind design.rst's open point (issue 9 point 5). Run as root,
# after the lab guest was built (/var/tmp/vtpcm-lab/guest). It starts two
# privileged libvirtd (9.0) in private mount namespaces (their /run,
# /var/lib/libvirt and /etc/libvirt are their own; the host's are untouched),
# two swtpm per "host" as per-VM uids, and TCG guests with a static DAC label
# "+QEMU_UID:+VM_GID" whose gid is the swtpm's, so the 0660 socket
# swtpm_uid:vm_gid admits that VM's QEMU only. Prints what it saw; stops
# everything it started, by pid. Holds the lab lock while it runs.
set -u
if [[ "${1:-}" != --locked ]]; then
    exec flock -w 900 /tmp/vtpcm-lab.lock timeout 600 "$0" --locked
fi
D=/var/tmp/vtpcm-daclab
GUEST=/var/tmp/vtpcm-lab/guest
# swtpm uid = vm gid (the agent's per-VM id); QEMU uid: a second per-VM id
SA=1950000001 SB=1950000002 SA2=1950000011
QA=1950000101 QB=1950000102 QA2=1950000111
PIDS=()
ok=1

say() { printf '%s\n' "$*"; }
check() {  # check WHAT EXPECTED ACTUAL
    if [[ "$2" == "$3" ]]; then say "ok   $1: $3"; else say "FAIL $1: expected $2, got $3"; ok=0; fi
}
cleanup() {
    for c in "$D/src.sock" "$D/dst.sock"; do
        for dom in dacA dacB; do
            virsh -q -c "qemu+unix:///system?socket=$c/libvirt-sock" destroy $dom >/dev/null 2>&1
        done
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for v in A B A2; do
        p=$(cat "$D/vm/$v/pid" 2>/dev/null) || continue
        ps -p "$p" -o args= 2>/dev/null | grep -q "$D/vm/$v/" && kill "$p"
    done
}
trap cleanup EXIT

[[ -r $GUEST/vmlinuz && -r $GUEST/initrd.gz ]] || { say "build the lab guest first"; exit 2; }
rm -rf "$D"
mkdir -p "$D"/{img/_base,img/a,img/b,vm}
chmod -R 755 "$D"
for v in a b; do cp "$GUEST/vmlinuz" "$GUEST/initrd.gz" "$D/img/$v/"; done
qemu-img create -q -f qcow2 "$D/img/_base/base.qcow2" 64M
for v in A B; do
    qemu-img create -q -f qcow2 -F qcow2 -b "$D/img/_base/base.qcow2" "$D/img/$v.qcow2"
done
chmod 644 "$D"/img/_base/base.qcow2 "$D"/img/*.qcow2 "$D"/img/?/*

daemon() {  # daemon NAME [qemu.conf extra line]: privileged libvirtd, own namespace
    local n=$1
    mkdir -p "$D/$n.etc/qemu/networks/autostart" "$D/$n.log" "$D/$n.sock"
    cp /etc/libvirt/libvirtd.conf /etc/libvirt/libvirt.conf "$D/$n.etc/"
    printf 'host_uuid = "%s"\nunix_sock_dir = "%s"\n' \
        "$(cat /proc/sys/kernel/random/uuid)" "$D/$n.sock" >> "$D/$n.etc/libvirtd.conf"
    printf 'stdio_handler = "file"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n%s\n' \
        "${2:-}" > "$D/$n.etc/qemu.conf"
    unshare --mount --propagation private sh -ec "
        mount -t tmpfs none /run; mkdir -p /run/lock
        mount -t tmpfs none /var/lib/libvirt; mount -t tmpfs none /var/cache/libvirt
        mount --bind $D/$n.log /var/log/libvirt; mount --bind $D/$n.etc /etc/libvirt
        exec /usr/sbin/libvirtd" >"$D/$n.log/out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do [[ -S $D/$n.sock/libvirt-sock ]] && return; sleep 0.2; done
    say "libvirtd $n did not start"; exit 1
}
swtpm_as() {  # swtpm_as NAME UID: swtpm as UID:UID, control socket 0660 UID:UID
    mkdir -p "$D/vm/$1/state"; chown -R "$2:$2" "$D/vm/$1"
    chmod 0711 "$D/vm/$1"; chmod 0700 "$D/vm/$1/state"
    setpriv --reuid "$2" --regid "$2" --clear-groups swtpm socket --tpm2 --daemon \
        --ctrl "type=unixio,path=$D/vm/$1/ctrl,mode=0660" --tpmstate "dir=$D/vm/$1/state" \
        --pid "file=$D/vm/$1/pid" --log "file=$D/vm/$1/log,level=2"
}
domxml() {  # domxml NAME LABEL SWTPM-DIR KERNEL-DIR [pin]: pin = base never relabelled
    local backing=""
    [[ ${5:-} == pin ]] && backing="<backingStore type='file'><format type='qcow2'/><source
      file='$D/img/_base/base.qcow2'><seclabel model='dac' relabel='no'/></source>
      <backingStore/></backingStore>"
    cat <<EOF
<domain type='qemu'><name>$1</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$D/img/$4/vmlinuz</kernel>
<initrd>$D/img/$4/initrd.gz</initrd><cmdline>console=ttyS0</cmdline></os>
<features><acpi/></features><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$D/img/${1#dac}.qcow2'/>$backing<target dev='vda' bus='virtio'/></disk>
<tpm model='tpm-crb'><backend type='external'>
<source type='unix' mode='connect' path='$D/vm/$3/ctrl'/></backend></tpm></devices>
<seclabel type='static' model='dac' relabel='yes'><label>$2</label></seclabel></domain>
EOF
}
src() { virsh -q -c "qemu+unix:///system?socket=$D/src.sock/libvirt-sock" "$@"; }
dst() { virsh -q -c "qemu+unix:///system?socket=$D/dst.sock/libvirt-sock" "$@"; }
owner() { stat -c %u:%g "$1"; }
xattrs() { /usr/bin/python3 -c "import os, sys; print(os.listxattr(sys.argv[1]))" "$1"; }
base_fd() {
    local f
    for f in /proc/"$(pgrep -f "guest=$1" | head -1)"/fd/*; do
        [[ $(readlink "$f") == */_base/base.qcow2 ]] && stat -c %A "$f"
    done
}
ids() { awk '/^Uid:/{u=$2} /^Gid:/{g=$2} /^Groups:/{print u":"g" groups="$2}' \
        "/proc/$(pgrep -f "guest=$1" | head -1)/status"; }
as() {  # as UID GID PYTHON: run a python snippet with exactly these ids
    setpriv --reuid "$1" --regid "$2" --clear-groups /usr/bin/python3 -c "$3" 2>&1; }
connect() {
    as "$1" "$2" "import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect('$3'); print('connected')
except OSError as e:
    print(e.strerror)"; }

say "libvirt $(libvirtd --version | awk '{print $3}'), $(qemu-system-x86_64 --version | head -1)"
daemon src
swtpm_as A $SA; swtpm_as B $SB
# A's base pinned: <backingStore> with <seclabel model='dac' relabel='no'/>
domxml dacA "+$QA:+$SA" A a pin > "$D/A.xml"
src create "$D/A.xml" >/dev/null || exit 1
check "QEMU A uid:gid" "$QA:$SA groups=$SA" "$(ids dacA)"
check "pinned shared base after A started" "0:0" "$(owner $D/img/_base/base.qcow2)"
check "A's QEMU holds the pinned base read-only (fd mode)" "lr-x------" "$(base_fd dacA)"

# same kernel file, different label: refused (remember_owner refcount)
domxml dacB "+$QB:+$SB" B a > "$D/B-samekernel.xml"
check "second domain sharing a relabelled file" "in use" \
    "$(src create "$D/B-samekernel.xml" 2>&1 | grep -o 'in use')"
domxml dacB "+$QB:+$SB" B b > "$D/B.xml"
src create "$D/B.xml" >/dev/null || exit 1
sleep 2
check "QEMU B uid:gid" "$QB:$SB groups=$SB" "$(ids dacB)"
check "shared base after B (not pinned) started: B's label" "$QB:$SB" \
    "$(owner $D/img/_base/base.qcow2)"
check "libvirt's remember xattrs on the base / on B's overlay" "[] / 3" \
    "$(xattrs "$D/img/_base/base.qcow2") / $(xattrs "$D/img/B.qcow2" | grep -o trusted | wc -l)"
check "B's QEMU opens the shared base for writing" "writable" \
    "$(as $QB $SB "import os; os.open('$D/img/_base/base.qcow2', os.O_WRONLY); print('writable')")"
check "QEMU A -> its own socket" connected "$(connect $QA $SA $D/vm/A/ctrl)"
check "QEMU A -> B's socket" "Permission denied" "$(connect $QA $SA $D/vm/B/ctrl)"
check "QEMU B -> A's socket" "Permission denied" "$(connect $QB $SB $D/vm/A/ctrl)"
check "QEMU B reads QEMU A's /proc environ (ptrace check)" "Permission denied" \
    "$(as $QB $SB "open('/proc/$(pgrep -f guest=dacA | head -1)/environ').read()" \
       | grep -o 'Permission denied')"
src destroy dacB >/dev/null
check "base after B stopped (never restored)" "$QB:$SB" "$(owner $D/img/_base/base.qcow2)"
check "B's overlay after B stopped (restored)" "0:0" "$(owner $D/img/B.qcow2)"

# B pinned too
chown 0:0 "$D/img/_base/base.qcow2"
swtpm_as B $SB
domxml dacB "+$QB:+$SB" B b pin > "$D/B-pin.xml"
src create "$D/B-pin.xml" >/dev/null || exit 1
sleep 2
check "pinned base while B runs" "0:0" "$(owner $D/img/_base/base.qcow2)"
check "B's QEMU holds the base read-only (fd mode)" "lr-x------" "$(base_fd dacB)"

# live migration of A to a second "host", label rewritten to its own ids.
# Both daemons share this file system, so the destination must not check
# the source's remember xattrs (remember_owner = 0), see design.rst.
daemon dst "remember_owner = 0"
swtpm_as A2 $SA2
src dumpxml --migratable dacA | sed "s#+$QA:+$SA#+$QA2:+$SA2#; s#vm/A/ctrl#vm/A2/ctrl#" \
    > "$D/A-dst.xml"
src migrate --live --unsafe dacA "qemu+unix:///system?socket=$D/dst.sock/libvirt-sock" \
    --migrateuri tcp://127.0.0.1:49400 --xml "$D/A-dst.xml" || ok=0
check "migrated QEMU A uid:gid" "$QA2:$SA2 groups=$SA2" "$(ids dacA)"
check "A's overlay after the source let go (source restored it)" "0:0" \
    "$(owner $D/img/A.qcow2)"
check "pinned base after A migrated" "0:0" "$(owner $D/img/_base/base.qcow2)"
check "destination QEMU holds the pinned base read-only" "lr-x------" "$(base_fd dacA)"
check "destination swtpm got the state" yes \
    "$(grep -q 'Ctrl Cmd' "$D/vm/A2/log" && echo yes)"
if [[ $ok == 1 ]]; then say "all as expected"; else say "SOME CHECKS DIFFERED"; exit 1; fi

#!/bin/sh
# /init of the vTPCM lab guest (busybox + tpm2-tools in an initramfs).
#
# Why it exists: the end-to-end tests need a guest that proves, over its
# serial console, that its TPM state (PCR16, an NV index, the EK) and its own
# life (uptime, boot id) survive a live migration. Every answer ends with a
# marker line "VTPCM-END <command line>" so the host-side client knows where
# it stops.

export PATH=/bin:/usr/bin:/sbin:/usr/sbin
export LD_LIBRARY_PATH=/lib:/usr/lib:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

NV_INDEX=0x1500016
EK_HANDLE=0x81010001

/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/printk

exec </dev/ttyS0 >/dev/ttyS0 2>&1
stty -echo 2>/dev/null

# Wait (bounded) for the TPM character device, unless the domain has none.
i=0
grep -q vtpcm_notpm /proc/cmdline && i=100
while [ ! -c /dev/tpm0 ] && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ -c /dev/tpmrm0 ]; then
    TPMDEV=/dev/tpmrm0
else
    TPMDEV=/dev/tpm0
fi
export TPM2TOOLS_TCTI="device:$TPMDEV"

BOOTID=$(cat /proc/sys/kernel/random/boot_id)

tpm_ok() {
    [ -c "$TPMDEV" ]
}

do_write() {
    # $1: exactly 32 bytes as 64 lowercase hex digits.
    hex="$1"
    case "$hex" in
        *[!0-9a-f]*|"") echo "ERROR bad hex"; return ;;
    esac
    if [ "${#hex}" -ne 64 ]; then
        echo "ERROR need 64 hex digits"
        return
    fi
    tpm_ok || { echo "ERROR no tpm"; return; }
    tpm2_pcrextend "16:sha256=$hex" >/tmp/out 2>&1 || {
        echo "ERROR pcrextend"; cat /tmp/out; return; }
    if ! tpm2_nvreadpublic "$NV_INDEX" >/dev/null 2>&1; then
        tpm2_nvdefine "$NV_INDEX" -C o -s 32 -a "ownerread|ownerwrite" >/tmp/out 2>&1 || {
            echo "ERROR nvdefine"; cat /tmp/out; return; }
    fi
    echo "$hex" | xxd -r -p > /tmp/nv.bin
    tpm2_nvwrite "$NV_INDEX" -C o -i /tmp/nv.bin >/tmp/out 2>&1 || {
        echo "ERROR nvwrite"; cat /tmp/out; return; }
    echo "OK"
}

do_report() {
    if tpm_ok; then
        pcr=$(tpm2_pcrread sha256:16 2>/dev/null | sed -n 's/.*16 *: *0x\([0-9A-Fa-f]*\).*/\1/p')
        echo "PCR16=$(echo "$pcr" | tr 'A-F' 'a-f')"
        if tpm2_nvread "$NV_INDEX" -C o -s 32 -o /tmp/nvr.bin >/dev/null 2>&1; then
            echo "NV=$(xxd -p -c 64 /tmp/nvr.bin)"
        else
            echo "NV=none"
        fi
        if tpm2_readpublic -c "$EK_HANDLE" -o /tmp/ek.pub >/dev/null 2>&1; then
            echo "EK=$(sha256sum /tmp/ek.pub | cut -d' ' -f1)"
        else
            echo "EK=none"
        fi
    else
        echo "PCR16=none"
        echo "NV=none"
        echo "EK=none"
    fi
    echo "UPTIME=$(cut -d' ' -f1 /proc/uptime)"
    echo "BOOTID=$BOOTID"
    echo "TPMDEV=$TPMDEV"
}

# dirty N: from now on dirty N MiB of distinct pages per second, as a busy
# guest would, so that a live migration has pages to resend. About 10 times
# a second the loop writes what the rate owes since the start (by
# /proc/uptime, so a slow tick under TCG is caught up, at most 4 ticks' worth
# at once) as random 64 KiB blocks at the next offset of a 64 MiB tmpfs
# file, wrapping around: a region rewritten in place would be only one
# tick's worth of pages dirty, whatever N. Random, not zero, bytes: QEMU
# sends a zero page as a few bytes. "dirty 0" stops it.
DIRTY_PID=
DIRTY_SPAN_BLOCKS=1024  # 64 KiB blocks: 64 MiB
centis() {
    cut -d' ' -f1 /proc/uptime | tr -d .
}
do_dirty() {
    rate="$1"
    case "$rate" in
        *[!0-9]*|"") echo "ERROR dirty needs MiB/s as digits"; return ;;
    esac
    if [ "$rate" -gt 256 ]; then
        echo "ERROR dirty rate above 256 MiB/s"
        return
    fi
    [ -n "$DIRTY_PID" ] && kill "$DIRTY_PID" 2>/dev/null
    DIRTY_PID=
    rm -f /tmp/dirty.src /tmp/dirty.dst
    if [ "$rate" -eq 0 ]; then
        echo "OK dirty 0"
        return
    fi
    tick=$((rate * 16 / 10))  # 64 KiB blocks per 0.1 s
    [ "$tick" -lt 1 ] && tick=1
    dd if=/dev/urandom of=/tmp/dirty.src bs=64k count=$((tick * 4)) 2>/dev/null
    (
        start=$(centis)
        written=0
        off=0
        while true; do
            owed=$(( ($(centis) - start) * rate * 16 / 100 - written ))
            [ "$owed" -gt $((tick * 4)) ] && owed=$((tick * 4))
            if [ "$owed" -gt 0 ]; then
                dd if=/tmp/dirty.src of=/tmp/dirty.dst bs=64k count="$owed" \
                    seek="$off" conv=notrunc 2>/dev/null
                written=$((written + owed))
                off=$(( (off + owed) % DIRTY_SPAN_BLOCKS ))
            fi
            # behind by more than the cap: forget the debt, keep the pace
            late=$(( ($(centis) - start) * rate * 16 / 100 - written ))
            [ "$late" -gt $((tick * 8)) ] && written=$((written + late - tick))
            sleep 0.1
        done
    ) </dev/null >/dev/null 2>&1 &
    DIRTY_PID=$!
    echo "OK dirty $rate"
}

echo "VTPCM-READY $BOOTID"

while true; do
    if ! read -r cmd arg rest; then
        sleep 0.2
        continue
    fi
    cmd=$(echo "$cmd" | tr -d '\r')
    arg=$(echo "$arg" | tr -d '\r')
    case "$cmd" in
        "") continue ;;
        ping) echo "pong $arg" ;;
        write) do_write "$arg" ;;
        report) do_report ;;
        dirty) do_dirty "$arg" ;;
        poweroff) echo "bye"; echo "VTPCM-END $cmd${arg:+ $arg}"; poweroff -f ;;
        *) echo "ERROR unknown command" ;;
    esac
    echo "VTPCM-END $cmd${arg:+ $arg}"
done

"""The agent's checks of ``[agent] swtpm_uid_range`` and ``qemu_uid_range``
on the host: no account, group, subordinate id block or systemd range in
them, not (uint16_t)-1, and the QEMU range paired with the swtpm range. Kept
apart from ``service`` so that the instance manager can check, at the
agent's start, the QEMU uids the recorded qemu FIRST and today's swtpm range
imply while ``qemu_uid_range`` is unset (``InstanceManager``).
"""

import grp
import pwd
from pathlib import Path

from vtpcm_common import exception, idrange

# uid ranges other allocators hand out without a passwd entry (systemd's
# UIDS-GIDS.md): a process of one of them with a swtpm's uid is that swtpm
SYSTEMD_RANGES = (("systemd-homed", 60001, 60513), ("systemd DynamicUser", 61184, 65519),
                  ("systemd container (nspawn --private-users)", 524288, 1879048191))
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
UID16_MINUS_ONE = 65535


def uid_range(text: str, subid_files: tuple[Path, ...] = SUBID_FILES,
              option: str = "swtpm_uid_range") -> tuple[int, int] | None:
    """``[agent] swtpm_uid_range`` (or ``option``) checked: FIRST-LAST
    (``idrange.parse``), and no account, group, subordinate id block (rootless
    containers) or systemd range in it: its uids must belong to no one else."""
    if not text:
        return None
    low, high = idrange.parse(text, "[agent] %s" % option)
    if low <= UID16_MINUS_ONE <= high:
        # (uid_t)-1 means "unchanged" to setresuid/fchown: a swtpm given it
        # would keep running as root; 65535 is the same on 16-bit uid calls
        raise exception.InvalidInput(
            reason="[agent] %s %s: contains %d, (uint16_t)-1"
            % (option, text, UID16_MINUS_ONE))
    for who, ids in (("user", ((p.pw_name, p.pw_uid) for p in pwd.getpwall())),
                     ("group", ((g.gr_name, g.gr_gid) for g in grp.getgrall()))):
        for name, num in ids:
            if low <= num <= high:
                raise exception.InvalidInput(
                    reason="[agent] %s %s: %s %s has id %d in it"
                    % (option, text, who, name, num))
    for what, start, end in SYSTEMD_RANGES:
        if low <= end and start <= high:
            raise exception.InvalidInput(
                reason="[agent] %s %s overlaps the %s range %d-%d"
                % (option, text, what, start, end))
    for path, owner, start, count in _subids(subid_files):
        if low < start + count and start <= high:
            raise exception.InvalidInput(
                reason="[agent] %s %s overlaps %s's block %d-%d in %s"
                % (option, text, owner, start, start + count - 1, path))
    return low, high


def qemu_uid_range(text: str, swtpm_uids: tuple[int, int] | None,
                   subid_files: tuple[Path, ...] = SUBID_FILES) -> tuple[int, int] | None:
    """``[agent] qemu_uid_range`` checked as ``uid_range``, and as large as
    ``swtpm_uid_range`` (set), not overlapping it: a QEMU whose uid is a
    swtpm's could ptrace that swtpm."""
    qemu = uid_range(text, subid_files, option="qemu_uid_range")
    if qemu is None:
        return None
    if swtpm_uids is None:
        raise exception.InvalidInput(
            reason="[agent] qemu_uid_range %s needs [agent] swtpm_uid_range (per-VM swtpm "
                   "uids)" % text)
    if qemu[1] - qemu[0] != swtpm_uids[1] - swtpm_uids[0]:
        raise exception.InvalidInput(
            reason="[agent] qemu_uid_range %s holds %d uids, [agent] swtpm_uid_range %d-%d "
                   "holds %d: they must be the same size" % (
                       text, qemu[1] - qemu[0] + 1, swtpm_uids[0], swtpm_uids[1],
                       swtpm_uids[1] - swtpm_uids[0] + 1))
    if qemu[0] <= swtpm_uids[1] and swtpm_uids[0] <= qemu[1]:
        raise exception.InvalidInput(
            reason="[agent] qemu_uid_range %s overlaps [agent] swtpm_uid_range %d-%d"
                   % (text, swtpm_uids[0], swtpm_uids[1]))
    return qemu


def _subids(files: tuple[Path, ...]) -> list[tuple[Path, str, int, int]]:
    """The ``owner:start:count`` blocks of /etc/subuid and /etc/subgid."""
    blocks = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            owner, _, rest = line.strip().partition(":")
            start, _, count = rest.partition(":")
            if start.isdigit() and count.isdigit():
                blocks.append((path, owner, int(start), int(count)))
    return blocks

"""A FIRST-LAST range of uids or gids given in an option, parsed and checked
once for both sides: the agent's ``[agent] swtpm_uid_range`` and
``qemu_uid_range``, the compute side's ``[vtpcm] qemu_uid_range`` and
``vm_gid_range``. What else each side requires of its ranges (no account in
them, no overlap, the same size) stays with that side.
"""

from __future__ import annotations

import re

from vtpcm_common import exception

UID_MAX = 4294967294  # 4294967295 is (uid_t)-1: "leave unchanged", i.e. root
# ASCII digits only, and no more of them than UID_MAX has: int() alone takes
# spaces, a sign, underscores and other scripts' digits, and str.isdigit()
# takes superscripts that int() then refuses; past 4300 digits int() raises
_RANGE = re.compile(r"([0-9]{1,10})-([0-9]{1,10})")


def parse(text: str, option: str) -> tuple[int, int]:
    """``text``, the value of ``option`` (``"[section] name"``, for the
    messages), as (FIRST, LAST): exactly two runs of the digits 0-9 joined
    by one ``-``, nothing around them, and 0 < FIRST <= LAST <= ``UID_MAX``
    (0 is root; (uid_t)-1 means "unchanged" to setresuid and chown)."""
    found = _RANGE.fullmatch(text)
    if found is None:
        raise exception.InvalidInput(
            reason="%s %r: need FIRST-LAST, two numbers of the digits 0-9 (nothing else)"
                   % (option, text))
    low, high = int(found.group(1)), int(found.group(2))
    if not 0 < low <= high <= UID_MAX:
        raise exception.InvalidInput(
            reason="%s %r: need 0 < FIRST <= LAST <= %d (0 is root)"
                   % (option, text, UID_MAX))
    return low, high

"""``idrange.parse``: the one FIRST-LAST parser of the agent's and the
compute side's uid and gid ranges. Anything but two runs of ASCII digits
joined by one hyphen is refused by name and value, never parsed leniently
(int() takes spaces, signs, underscores and other scripts' digits) and
never let through to a ValueError (str.isdigit() takes superscripts)."""

import pytest

from tests.refusal import refused
from vtpcm_common import exception, idrange

OPTION = "[agent] swtpm_uid_range"
SYNTAX = "Invalid input: %s %r: need FIRST-LAST, two numbers of the digits 0-9 (nothing else)"
BOUNDS = "Invalid input: %s %r: need 0 < FIRST <= LAST <= 4294967294 (0 is root)"


@pytest.mark.parametrize(("text", "expected"), [
    ("1-1", (1, 1)),
    ("1900000000-1900999999", (1900000000, 1900999999)),
    ("1-4294967294", (1, 4294967294)),  # UID_MAX itself
    ("0064200-0064209", (64200, 64209)),  # leading zeros are still digits
])
def test_a_range_is_taken(text, expected):
    assert idrange.parse(text, OPTION) == expected


@pytest.mark.parametrize("text", [
    "",  # empty
    "-",
    "5",  # no LAST
    "5-",
    "-5",
    "-5-10",  # negative FIRST
    "5--10",  # negative LAST
    "a-b",  # not digits
    "0x10-0x20",
    "1e3-2e3",
    "1-2-3",
    " 1-5",  # spaces: int() took them
    "1-5 ",
    "1 -5",
    "1- 5",
    "1-5\n",  # a trailing newline: "$" in a regex takes it
    "+1-5",  # a sign: int() took it
    "1_000-2_000",  # underscores: int() took them
    "\uff11-\uff15",  # fullwidth digits: int() took them, isdigit() too
    "\u0661-\u0665",  # Arabic-Indic digits: the same
    "1\u00b2-5",  # a superscript: isdigit() took it, then int() raised ValueError
    "12345678901-12345678902",  # 11 digits: more than UID_MAX has
    "1-" + "9" * 5000,  # int() raises ValueError past 4300 digits
])
def test_anything_but_two_runs_of_digits_is_refused_by_name_and_value(text):
    with refused(exception.InvalidInput, SYNTAX % (OPTION, text)):
        idrange.parse(text, OPTION)


@pytest.mark.parametrize("text", [
    "0-10",  # 0 is root
    "0-0",
    "20-10",  # FIRST > LAST
    "4294967294-4294967293",
    "4294967290-4294967295",  # (uid_t)-1: "unchanged", root stays root
    "4294967295-4294967295",
    "1-9999999999",  # beyond UID_MAX, still 10 digits
])
def test_zero_reversed_or_beyond_uid_max_is_refused_by_name_and_value(text):
    with refused(exception.InvalidInput, BOUNDS % ("[vtpcm] vm_gid_range", text)):
        idrange.parse(text, "[vtpcm] vm_gid_range")


def test_uid_max_is_the_last_uid_before_minus_one():
    assert idrange.UID_MAX == 2**32 - 2


"""``[agent] swtpm_uid_range`` parsing: a range that overlaps an account or
a group would let that account reach a swtpm's files, so it is refused."""

import grp
import pwd

import pytest

from tests.refusal import refused
from vtpcm_agent import service
from vtpcm_common import exception


def test_empty_means_swtpm_runs_as_the_agent():
    assert service.uid_range("") is None


def test_a_free_range_is_taken():
    assert service.uid_range("64200-64209") == (64200, 64209)


@pytest.mark.parametrize("text", ["0-10", "20-10"])
def test_zero_or_reversed_is_refused(text):
    with refused(exception.InvalidInput,
                 "Invalid input: [agent] swtpm_uid_range %s: need 0 < FIRST <= LAST" % text):
        service.uid_range(text)


def test_a_range_with_an_account_in_it_is_refused():
    nobody = pwd.getpwnam("nobody").pw_uid
    with refused(exception.InvalidInput,
                 "Invalid input: [agent] swtpm_uid_range %d-%d: user nobody has id %d in "
                 "it" % (nobody, nobody, nobody)):
        service.uid_range("%d-%d" % (nobody, nobody))


def test_a_range_with_a_group_in_it_is_refused():
    users = {p.pw_uid for p in pwd.getpwall()}
    group = next(g for g in grp.getgrall() if g.gr_gid not in users and g.gr_gid > 0)
    with refused(exception.InvalidInput,
                 "Invalid input: [agent] swtpm_uid_range %d-%d: group %s has id %d in "
                 "it" % (group.gr_gid, group.gr_gid, group.gr_name, group.gr_gid)):
        service.uid_range("%d-%d" % (group.gr_gid, group.gr_gid))

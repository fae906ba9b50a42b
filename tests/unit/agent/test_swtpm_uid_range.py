"""``[agent] swtpm_uid_range`` parsing: a range that overlaps an account or
a group would let that account reach a swtpm's files, so it is refused."""

import grp
import logging
import pwd
import re
import sqlite3
from pathlib import Path

import pytest
from oslo_config import cfg

from tests.refusal import refused
from vtpcm_agent import association, instances, service
from vtpcm_agent import conf as agent_conf
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_common import exception

DEVSTACK_DEFAULT = "1900000000-1900999999"  # devstack/settings VTPCM_SWTPM_UID_RANGE


def test_empty_means_swtpm_runs_as_the_agent():
    assert service.uid_range("") is None


def test_a_free_range_is_taken():
    assert service.uid_range("1900000000-1900000999") == (1900000000, 1900000999)


@pytest.mark.parametrize(("text", "what", "start", "end"), [
    ("64500-64599", "systemd DynamicUser", 61184, 65519),  # the lab's range before
    ("2000000-2000999", "systemd container (nspawn --private-users)", 524288, 1879048191),
    ("60000-60001", "systemd-homed", 60001, 60513)])
def test_a_range_systemd_hands_out_is_refused(text, what, start, end):
    with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range %s overlaps "
                 "the %s range %d-%d" % (text, what, start, end)):
        service.uid_range(text, subid_files=())


def test_a_range_in_a_subordinate_id_block_is_refused(tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\n")
    subgid.write_text("alice:100000:65536\n# a comment\nbob:1900000500:10\n")
    assert service.uid_range("1900000000-1900000499", (subuid, subgid)) \
        == (1900000000, 1900000499)  # control: just below bob's block
    with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range "
                 "1900000000-1900000500 overlaps bob's block 1900000500-1900000509 in %s"
                 % subgid):
        service.uid_range("1900000000-1900000500", (subuid, subgid))
    with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range "
                 "165535-170000 overlaps alice's block 100000-165535 in %s" % subuid):
        service.uid_range("165535-170000", (subuid, subgid))


def test_the_shipped_defaults_are_safe():
    # read, not imported: importing the lab picks oslo's threading backend
    repo = Path(__file__).resolve().parents[3]
    lab = re.findall(r'"(\d+-\d+)"', re.search(r"SWTPM_UID_RANGES = \{.*\}", (
        repo / "vtpcm_lab" / "stack.py").read_text()).group(0))
    devstack = re.search(r"VTPCM_SWTPM_UID_RANGE:-(\d+-\d+)",
                         (repo / "devstack" / "settings").read_text()).group(1)
    assert len(lab) == 2 and devstack == DEVSTACK_DEFAULT
    for text in (*lab, devstack):
        assert service.uid_range(text, subid_files=()) is not None


def test_words_are_refused():
    with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range 'a-b': "
                 "need FIRST-LAST, two numbers of the digits 0-9 (nothing else)"):
        service.uid_range("a-b")



@pytest.mark.parametrize("text", [" 1900000000-1900000999", "1900000000-1_900_000_999",
                                  "+1900000000-1900000999"])
def test_what_int_takes_beside_digits_is_refused(text):
    """Parsed by ``idrange.parse`` (shared with the compute side): int()
    alone took spaces, underscores and a sign."""
    with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range %r: need "
                 "FIRST-LAST, two numbers of the digits 0-9 (nothing else)" % text):
        service.uid_range(text, subid_files=())

@pytest.mark.parametrize("text", ["0-10", "20-10"])
def test_zero_or_reversed_is_refused(text):
    with refused(exception.InvalidInput,
                 "Invalid input: [agent] swtpm_uid_range '%s': need 0 < FIRST <= LAST "
                 "<= 4294967294 (0 is root)" % text):
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


def test_uid_minus_one_is_refused():
    """(uid_t)-1 means "unchanged": swtpm given it runs as root (review
    round 2 of isofix, MEDIUM 4, proof q3)."""
    assert service.uid_range("4294967290-4294967294", subid_files=()) \
        == (4294967290, 4294967294)  # control: just below it
    with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range "
                 "'4294967290-4294967295': need 0 < FIRST <= LAST <= 4294967294 (0 is root)"):
        service.uid_range("4294967290-4294967295", subid_files=())


def test_uid16_minus_one_is_refused():
    assert service.uid_range("65536-65600", subid_files=()) == (65536, 65600)  # control
    with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range "
                 "65530-65540: contains 65535, (uint16_t)-1"):
        service.uid_range("65530-65540", subid_files=())


def test_qemu_uid_range_pairs_with_the_swtpm_range():
    swtpm = (1900000000, 1900000999)
    assert service.qemu_uid_range("", swtpm) is None
    assert service.qemu_uid_range("1900001000-1900001999", swtpm, subid_files=()) \
        == (1900001000, 1900001999)
    with refused(exception.InvalidInput, "Invalid input: [agent] qemu_uid_range "
                 "1900001000-1900001999 needs [agent] swtpm_uid_range (per-VM swtpm uids)"):
        service.qemu_uid_range("1900001000-1900001999", None, subid_files=())
    with refused(exception.InvalidInput, "Invalid input: [agent] qemu_uid_range "
                 "1900001000-1900001998 holds 999 uids, [agent] swtpm_uid_range "
                 "1900000000-1900000999 holds 1000: they must be the same size"):
        service.qemu_uid_range("1900001000-1900001998", swtpm, subid_files=())
    # a QEMU uid that is some VM's swtpm uid could ptrace that swtpm
    with refused(exception.InvalidInput, "Invalid input: [agent] qemu_uid_range "
                 "1900000500-1900001499 overlaps [agent] swtpm_uid_range "
                 "1900000000-1900000999"):
        service.qemu_uid_range("1900000500-1900001499", swtpm, subid_files=())
    # checked as swtpm_uid_range is, named as itself
    with refused(exception.InvalidInput, "Invalid input: [agent] qemu_uid_range '0-999': "
                 "need 0 < FIRST <= LAST <= 4294967294 (0 is root)"):
        service.qemu_uid_range("0-999", (1, 1000), subid_files=())


def test_qemu_uid_range_refuses_a_shared_socket_owner():
    """The QEMU uids separate VMs only if each socket is its VM's U:U."""
    conf = cfg.ConfigOpts()
    agent_conf.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("swtpm_uid_range", "1900000000-1900000999", group="agent")
    conf.set_override("qemu_uid_range", "1900001000-1900001999", group="agent")
    conf.set_override("socket_group", "root", group="agent")
    with refused(exception.InvalidInput, "Invalid input: [agent] qemu_uid_range needs "
                 "socket_user and socket_group unset (each socket then belongs to its VM's "
                 "uid and gid)"):
        service.settings_from(conf)
    conf.clear_override("socket_group", group="agent")
    settings = service.settings_from(conf)
    assert settings.qemu_uids == (1900001000, 1900001999)
    assert settings.swtpm_uids == (1900000000, 1900000999)


def _manager(tmp_path: Path, uids: tuple[int, int] | None, list_: association.AssociationList,
             qemu_uids: tuple[int, int] | None = None) -> instances.InstanceManager:
    settings = instances.AgentSettings(host="h", state_root=tmp_path / "state",
                                       run_dir=tmp_path / "run", swtpm_uids=uids,
                                       qemu_uids=qemu_uids,
                                       subid_files=(tmp_path / "no-subuid",))
    keys = KeyStore(tmp_path / "keys", DevKeyFileHostKey(tmp_path / "hostkey"))
    return instances.InstanceManager(settings, list_, keys)


def test_the_agents_start_says_when_the_range_is_unusable_or_nearly_used_up(tmp_path,
                                                                           caplog):
    """Review round 2 of the sweep, P1/P3: a list upgraded from v5 trusts no
    uid of the range (ERROR naming what to do), and a range with few uids
    left (fewer than 100 or a tenth) is worth a WARNING before creates
    start failing."""
    path = tmp_path / "a.sqlite"
    conn = sqlite3.connect(path)
    for step in association.STEPS[:5]:
        for statement in step.split(";"):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    al = association.AssociationList(path)
    try:
        caplog.set_level(logging.WARNING, logger="vtpcm_agent.instances")
        assert _manager(tmp_path, (5000, 5999), al).check_uid_range() == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors[0] == (
            "No swtpm uid can be given out: creating or migrating in a vTPCM will fail. "
            "[agent] swtpm_uid_range 5000-5999 cannot be used: the association list was "
            "upgraded from schema version 5, which kept no record of the uids it freed, so "
            "every uid up to 5999 may have run a vTPCM and none of them is given out again; "
            "set a fresh [agent] swtpm_uid_range above 5999 (its FIRST at least 6000)")
        caplog.clear()
        manager = _manager(tmp_path, (6000, 6999), al)  # a fresh range: quiet
        assert manager.check_uid_range() == 1000
        assert [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "vtpcm_agent.instances"] == []
        for i in range(901):
            al.assign_uid("i%d" % i, 6000, 6999)
        assert manager.check_uid_range() == 99
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                    and r.name == "vtpcm_agent.instances"]
        assert warnings == ["Only 99 uid(s) of [agent] swtpm_uid_range 6000-6999 are left to "
                            "give out (a uid is never given out twice: one per vTPCM created "
                            "or migrated in); widen the range (raise LAST) before it is used "
                            "up"]
    finally:
        al.close()


def _moved(option: str, now: int, count: int, was: int, freed: int = 0) -> str:
    return ("Invalid input: [agent] %s starts at %d, but uids were given out while it "
            "started at %d (%d in use or kept aside, %d freed; a freed uid and the QEMU "
            "uid paired with it are never given out again): a VM's QEMU uid is computed "
            "from both FIRSTs, and a moved FIRST would give one out again; set its FIRST "
            "back to %d and widen the range by raising LAST only"
            % (option, now, was, count, freed, was))


def test_a_ranges_first_that_moved_while_uids_are_in_use_stops_the_agent(tmp_path, caplog):
    """Review of dacbuild round 2, LOW 5: Q = qemu FIRST + (U - swtpm FIRST)
    from today's ranges; a FIRST moved while VMs ran made the agent kill
    and sweep another uid than a VM's QEMU (or pair a new U with a running
    VM's Q). The FIRSTs are recorded; a change is refused while a uid is in
    use or kept aside, with an ERROR naming the option."""
    al = association.AssociationList(tmp_path / "a.sqlite")
    try:
        swtpm, qemu = (6000, 6999), (8000, 8999)
        _manager(tmp_path, swtpm, al, qemu)
        al.assign_uid("a", *swtpm)
        caplog.set_level(logging.ERROR, logger="vtpcm_agent.instances")
        with refused(exception.InvalidInput, _moved("qemu_uid_range", 8100, 1, 8000)):
            _manager(tmp_path, swtpm, al, (8100, 9099))
        assert caplog.records[-1].getMessage() == "Refusing to start: " + _moved(
            "qemu_uid_range", 8100, 1, 8000)
        with refused(exception.InvalidInput, _moved("swtpm_uid_range", 5000, 1, 6000)):
            _manager(tmp_path, (5000, 6999), al, (7000, 8999))
        # LAST raised: taken; qemu_uid_range unset (option being turned
        # off): taken, its FIRST kept for when it is set again
        _manager(tmp_path, (6000, 7999), al, (8000, 9999))
        _manager(tmp_path, swtpm, al, None)
        with refused(exception.InvalidInput, _moved("qemu_uid_range", 9000, 1, 8000)):
            _manager(tmp_path, swtpm, al, (9000, 9999))
        # a uid kept aside counts as in use
        al.keep_uid("a")
        with refused(exception.InvalidInput, _moved("swtpm_uid_range", 6500, 1, 6000)):
            _manager(tmp_path, (6500, 6999), al, qemu)
        # nothing in use, but a uid was freed: still refused (round 3, LOW 2)
        al.release_kept(al.kept_uids()[0][1])
        with refused(exception.InvalidInput, _moved("swtpm_uid_range", 7000, 0, 6000, 1)):
            _manager(tmp_path, (7000, 7999), al, (9000, 9999))
    finally:
        al.close()
    # a list that never gave a uid out takes new FIRSTs
    al = association.AssociationList(tmp_path / "b.sqlite")
    try:
        _manager(tmp_path, (6000, 6999), al, (8000, 8999))
        _manager(tmp_path, (7000, 7999), al, (9000, 9999))
        al.assign_uid("b", 7000, 7999)
        with refused(exception.InvalidInput, _moved("swtpm_uid_range", 6000, 1, 7000)):
            _manager(tmp_path, (6000, 6999), al, (8000, 8999))
    finally:
        al.close()


def test_a_first_never_moves_once_a_uid_was_given_out_even_on_an_empty_host(
        tmp_path, caplog):
    """Review of the DAC label round 3, LOW 2 (qreuse.py): with no uid in
    use, the swtpm FIRST moved and vm-B's U paired with vm-A's QEMU uid
    (freed, "never given out again"); the qemu FIRST moved onto the old
    swtpm range and a freed swtpm uid became a QEMU uid. Once any uid was
    given out (freed, or a floor an upgrade recorded), a FIRST move stops
    the agent with an ERROR naming the option."""
    al = association.AssociationList(tmp_path / "a.sqlite")
    caplog.set_level(logging.ERROR, logger="vtpcm_agent.instances")
    try:
        s1, q1 = (1000, 1999), (5000, 5999)
        _manager(tmp_path, s1, al, q1)
        al.assign_uid("vm-A", *s1)
        al.release_uid("vm-A")
        with refused(exception.InvalidInput, _moved("swtpm_uid_range", 3000, 0, 1000, 1)):
            _manager(tmp_path, (3000, 3999), al, q1)
        assert caplog.records[-1].getMessage() == "Refusing to start: " + _moved(
            "swtpm_uid_range", 3000, 0, 1000, 1)
        with refused(exception.InvalidInput, _moved("swtpm_uid_range", 7000, 0, 1000, 1)):
            _manager(tmp_path, (7000, 7999), al, (1000, 1999))
        # unset, then set elsewhere: the recorded FIRST stays, the move is refused
        _manager(tmp_path, s1, al, None)
        assert al.range_firsts() == (1000, 5000)
        with refused(exception.InvalidInput, _moved("qemu_uid_range", 6000, 0, 5000, 1)):
            _manager(tmp_path, s1, al, (6000, 6999))
        _manager(tmp_path, (1000, 2999), al, (5000, 6999))  # LAST raised: taken
        # the same uids as before: taken, and the next VM gets a fresh pair
        u = al.assign_uid("vm-B", 1000, 2999)
        assert u == 1001
        assert _manager(tmp_path, (1000, 2999), al, (5000, 6999)).qemu_uid_for(u) == 5001
    finally:
        al.close()
    # the QEMU uids given out (5000-5001) never become swtpm uids: a LAST
    # raised into them, qemu_uid_range unset, is refused
    al = association.AssociationList(tmp_path / "a.sqlite")
    try:
        with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range "
                     "1000-5000 overlaps the QEMU uids given out (5000-5001: qemu_uid_range "
                     "started at 5000); a QEMU uid is never given out again, as a swtpm uid "
                     "either: keep the range's LAST below 5000"):
            _manager(tmp_path, (1000, 5000), al, None)
        _manager(tmp_path, (1000, 4999), al, None)
    finally:
        al.close()
    # a floor (a list upgraded from v5/v6, no QEMU uid ever given) is left
    # by a FIRST above it, as its advice says
    al = association.AssociationList(tmp_path / "b.sqlite")
    try:
        _manager(tmp_path, (1000, 1999), al, (5000, 5999))
        with al._transaction() as cur:
            cur.execute("INSERT INTO swtpm_uid_floor VALUES (1, 1999, 'upgraded', 'now')")
        _manager(tmp_path, (3000, 3999), al, (6000, 6999))
        assert al.range_firsts() == (3000, 6000)
    finally:
        al.close()


def test_a_qemu_range_set_late_on_a_freed_swtpm_uid_is_refused(tmp_path):
    """A qemu_uid_range set where none was recorded must not hold a uid once
    given out as a swtpm uid (it would be some VM's QEMU uid now)."""
    al = association.AssociationList(tmp_path / "a.sqlite")
    try:
        _manager(tmp_path, (1000, 1999), al)
        for vm in ("a", "b", "c"):
            al.assign_uid(vm, 1000, 1999)
        al.release_uid("c")  # 1002 freed
        with refused(exception.InvalidInput, "Invalid input: [agent] qemu_uid_range "
                     "1002-1003 holds uid 1002, once given out as a swtpm uid (never given "
                     "out again); choose a qemu_uid_range no swtpm uid was ever given from"):
            association.AssociationList.check_range_firsts(al, 1000, 1002, 1001, 1003)
        _manager(tmp_path, (1000, 1999), al, (5000, 5999))
        assert al.range_firsts() == (1000, 5000)
    finally:
        al.close()


def test_a_last_below_a_uid_in_use_stops_the_agent(tmp_path, caplog):
    """Round 3, LOW 3 (qreuse.py): LAST shrunk below a U in use was taken,
    and that VM's QEMU uid fell out of what the agent kills and sweeps."""
    al = association.AssociationList(tmp_path / "a.sqlite")
    caplog.set_level(logging.ERROR, logger="vtpcm_agent.instances")
    msg = ("Invalid input: [agent] swtpm_uid_range ends at 1001, below swtpm uid 1002, in "
           "use or kept aside (a range shrinks only above the uids it has in use); set its "
           "LAST back to at least 1002")
    try:
        _manager(tmp_path, (1000, 1999), al, (5000, 5999))
        for vm in ("vm-0", "vm-1", "vm-2"):
            al.assign_uid(vm, 1000, 1999)
        with refused(exception.InvalidInput, msg):
            _manager(tmp_path, (1000, 1001), al, (5000, 5001))
        assert caplog.records[-1].getMessage() == "Refusing to start: " + msg
        al.keep_uid("vm-2")  # kept aside: still refused
        with refused(exception.InvalidInput, msg):
            _manager(tmp_path, (1000, 1001), al, (5000, 5001))
        _manager(tmp_path, (1000, 1002), al, (5000, 5002))
    finally:
        al.close()


def test_a_vms_qemu_uid_is_killed_and_swept_whatever_todays_ranges_say(tmp_path,
                                                                       monkeypatch):
    """Round 3, LOW 3 (qreuse.py): with qemu_uid_range unset while a VM
    still ran labelled, qemu_uid_for answered None and its Q was neither
    killed nor swept nor kept aside. Q comes from the recorded FIRSTs."""
    from vtpcm_agent.swtpm import uidprocs
    touched: list[tuple[int, ...]] = []
    monkeypatch.setattr(uidprocs, "kill_and_sweep",
                        lambda uids, timeout: touched.append(uids) or [])
    al = association.AssociationList(tmp_path / "a.sqlite")
    try:
        _manager(tmp_path, (1000, 1999), al, (5000, 5999))
        u = al.assign_uid("vm-A", 1000, 1999)
        agent = _manager(tmp_path, (1000, 1999), al, None)  # the option turned off
        assert agent.qemu_uid_for(u) == 5000
        assert agent.vm_ids("vm-A") is None  # no label handed out without the range
        agent._drop_own_files("vm-A")
        assert touched == [(1000, 5000)]  # killed and swept together
        assert al.uid_of("vm-A") is None
        # a pair with leftovers is kept aside and swept again, Q with U
        al.assign_uid("vm-B", 1000, 1999)

        def leftover(uids: tuple[int, ...], timeout: float) -> list[str]:
            touched.append(uids)
            raise exception.SwtpmError(vtpcm_id="-", reason="a leftover")
        monkeypatch.setattr(uidprocs, "kill_and_sweep", leftover)
        agent._drop_own_files("vm-B")
        assert al.kept_uids() == [("vm-B", 1001)]
        assert agent.sweep_kept() == 1
        assert touched[1:] == [(1001, 5001), (1001, 5001)]
    finally:
        al.close()


def _implied(swtpm: tuple[int, int], qemu: tuple[int, int], reason: str) -> str:
    return ("Invalid input: [agent] swtpm_uid_range %d-%d pairs its uids with the QEMU "
            "uids %d-%d (qemu_uid_range is unset, but uids were given out while it started "
            "at %d: a VM's QEMU uid is still computed from that FIRST, and killed and swept "
            "with its swtpm uid), and those are not free: %s; keep swtpm_uid_range's LAST "
            "so that the QEMU uids it implies stay free (checked as qemu_uid_range is), or "
            "set qemu_uid_range again"
            % (swtpm + qemu + (qemu[0], reason)))


def test_qemu_uids_a_widened_swtpm_range_implies_are_checked_while_the_option_is_unset(
        tmp_path, caplog):
    """Review of the DAC label round 4, MEDIUM 1 (q_unchecked.py): with
    qemu_uid_range unset, swtpm_uid_range's LAST raised was taken, and
    qemu_uid_for paired each new swtpm uid with a Q from the recorded FIRST
    that no check had seen: in systemd's DynamicUser range, 65535, or
    another running VM's swtpm uid (whose swtpm the new VM's destroy then
    killed and swept). The QEMU uids today's swtpm range implies are checked
    as qemu_uid_range is, at the agent's start; beyond them there is no Q."""
    al = association.AssociationList(tmp_path / "a.sqlite")
    caplog.set_level(logging.ERROR, logger="vtpcm_agent.instances")
    try:
        _manager(tmp_path, (70000, 70009), al, (40000, 40009))
        u = al.assign_uid("vm-A", 70000, 70009)  # keeps running labelled +40000:+70000
        off = _manager(tmp_path, (70000, 70009), al, None)  # the option turned off
        assert off.qemu_uid_for(u) == 40000
        assert off.qemu_uid_for(70009) == 40009
        assert off.qemu_uid_for(70010) is None  # beyond the range checked: no Q
        homed = _implied((70000, 90100), (40000, 60100),
                         "[agent] qemu_uid_range 40000-60100 overlaps the systemd-homed "
                         "range 60001-60513")
        with refused(exception.InvalidInput, homed):
            _manager(tmp_path, (70000, 90100), al, None)
        assert caplog.records[-1].getMessage() == "Refusing to start: " + homed
        with refused(exception.InvalidInput, _implied(
                (70000, 95535), (40000, 65535),
                "[agent] qemu_uid_range 40000-65535: contains 65535, (uint16_t)-1")):
            _manager(tmp_path, (70000, 95535), al, None)
        assert al.range_firsts() == (70000, 40000)
        # a LAST whose QEMU uids are free is taken, and pairs as before
        wider = _manager(tmp_path, (70000, 70999), al, None)
        assert wider.qemu_uid_for(70999) == 40999
        assert wider.qemu_uid_for(71000) is None
    finally:
        al.close()
    # vm-N's Q would have been vm-A's swtpm uid, whose swtpm vm-N's destroy
    # would then have killed
    al = association.AssociationList(tmp_path / "b.sqlite")
    try:
        _manager(tmp_path, (70000, 70009), al, (66000, 66009))
        al.assign_uid("vm-A", 70000, 70009)
        with refused(exception.InvalidInput, _implied(
                (70000, 74100), (66000, 70100), "[agent] qemu_uid_range 66000-70100 "
                "overlaps [agent] swtpm_uid_range 70000-74100")):
            _manager(tmp_path, (70000, 74100), al, None)
        assert _manager(tmp_path, (70000, 70009), al, None).qemu_uid_for(74000) is None
    finally:
        al.close()


def test_swtpm_uid_range_unset_while_uids_are_in_use_or_kept_stops_the_agent(
        tmp_path, caplog):
    """Review of the DAC label round 4, LOW 5: with swtpm_uid_range unset,
    _drop_own_files and sweep_kept returned at once: the U and Q of VMs
    still running under their own uids were never killed or swept on
    destroy, and the recorded ranges never checked again. The agent refuses
    to start unset while a uid is in use or kept aside."""
    al = association.AssociationList(tmp_path / "a.sqlite")
    caplog.set_level(logging.ERROR, logger="vtpcm_agent.instances")
    try:
        _manager(tmp_path, (1000, 1999), al, (5000, 5999))
        al.assign_uid("vm-A", 1000, 1999)
        al.assign_uid("vm-B", 1000, 1999)
        al.keep_uid("vm-B")
        msg = ("Invalid input: [agent] swtpm_uid_range is unset, but swtpm uids are in use "
               "(1: 1000) and kept aside (1: 1001): their swtpm and QEMU processes would "
               "no longer be killed, nor their files swept, when their vTPCMs go; set "
               "swtpm_uid_range back (its FIRST was 1000); to turn it off, first destroy "
               "or migrate away every vTPCM whose swtpm runs as a uid of its own and wait "
               "until the agent logs each kept uid freed")
        with refused(exception.InvalidInput, msg):
            _manager(tmp_path, None, al)
        assert caplog.records[-1].getMessage() == "Refusing to start: " + msg
        al.release_uid("vm-A")
        with refused(exception.InvalidInput, msg.replace("in use (1: 1000) and ", "")):
            _manager(tmp_path, None, al)
        al.release_kept(1001)
        assert _manager(tmp_path, None, al).settings.swtpm_uids is None  # freed only: taken
    finally:
        al.close()

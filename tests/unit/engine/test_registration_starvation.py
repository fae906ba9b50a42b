"""Review finding 2: a flood of ``register_agent`` casts, or a victim's name
announced before its agent listens, kept a real host from being enrolled
for good (one announcement at agent start, the newest name dropped from a
full queue, the per-name interval taken by a failed try). The reviewer's
scenarios, with the agent's re-announcement, end with the host enrolled."""

import threading
import time

from vtpcm_agent.announce import Announcer, delays
from vtpcm_nova.engine.registrations import Registrations

REAL = "compute-real"


def test_a_steady_flood_of_fresh_names_does_not_keep_a_real_host_out() -> None:
    contacted = threading.Event()  # the agent's engine_contact
    probed: list[str] = []

    def answers(host: str) -> bool:
        probed.append(host)
        if host.startswith("fake"):
            time.sleep(0.3)  # the probe timeout on a name nobody serves
            return False
        return True

    enrolled: list[str] = []

    def enroll(host: str) -> None:
        enrolled.append(host)
        if host.startswith("fake"):
            time.sleep(2.0)  # get_identity waits for rpc_timeout on a fake name
            return
        contacted.set()      # the engine's vouched get_identity

    regs = Registrations(enroll, workers=1, backlog=16, per_host_interval=60,
                         answers=answers)
    regs.start()
    announcer = Announcer(lambda: regs.submit(REAL), contacted,
                          first_delay=0.2, max_delay=0.4, max_announcements=100)
    try:
        for i in range(17):  # the attacker fills the backlog first
            regs.submit("fake-%d" % i)
        announcer.start()
        stop, i = time.monotonic() + 20.0, 17  # done in ~5 s; a margin for slow CI
        while time.monotonic() < stop and not contacted.is_set():
            regs.submit("fake-%d" % i)  # a fresh name per enrollment time
            i += 1
            time.sleep(0.25)
        assert contacted.is_set(), "real host not enrolled under the flood"
        assert regs.dropped > 0  # the flood did fill the queue
        assert enrolled == [REAL]  # no fake name got past the probe
    finally:
        announcer.stop()
        regs.stop()
    sent = announcer.sent
    time.sleep(0.5)
    assert announcer.sent == sent  # contacted: no more announcements


def test_a_name_announced_before_its_agent_listens_is_enrolled_later() -> None:
    agent_up = threading.Event()
    contacted = threading.Event()
    tried: list[str] = []

    def enroll(host: str) -> None:
        tried.append(host)
        if not agent_up.is_set():
            raise RuntimeError("MessagingTimeout: agent not listening yet")
        contacted.set()

    regs = Registrations(enroll, workers=1, backlog=16, per_host_interval=0.5)
    regs.start()
    announcer = Announcer(lambda: regs.submit("compute-7"), contacted,
                          first_delay=0.2, max_delay=0.4, max_announcements=20)
    try:
        assert regs.submit("compute-7")  # the attacker, before the agent listens
        time.sleep(0.2)
        agent_up.set()
        announcer.start()  # the real agent: its first announcement is refused
        assert contacted.wait(5.0), tried
        assert tried[0] == "compute-7" and len(tried) >= 2
    finally:
        announcer.stop()
        regs.stop()


def test_announcements_are_bounded() -> None:
    assert delays(15, 900, 10) == [15, 30, 60, 120, 240, 480, 900, 900, 900]
    sent: list[int] = []
    announcer = Announcer(lambda: sent.append(1), threading.Event(),
                          first_delay=0.01, max_delay=0.02, max_announcements=4)
    announcer.run()
    assert len(sent) == 4


def test_a_full_queue_drops_its_oldest_name_and_forgets_its_interval() -> None:
    regs = Registrations(lambda host: None, workers=1, backlog=2, per_host_interval=60)
    assert regs.submit("a") and regs.submit("b")
    assert regs.submit("c")  # full: "a" makes room
    assert regs.pending() == 2 and regs.dropped == 1
    assert not regs.submit("c")  # queued already: no change
    assert not regs.submit("b") and regs.dropped == 1
    assert regs.submit("a")  # dropped, not tried: its next announcement counts
    assert regs.dropped == 2  # "b" made room

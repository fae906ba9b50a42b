"""The control-channel proxy's policy (pure): framing of QEMU 7.2's
requests, what may pass to swtpm, and the blobs recorded. The proxy
process and real swtpm: tests/functional/agent/test_ctrlproxy.py."""

import hashlib
import struct

import pytest

from vtpcm_agent.swtpm import ctrlpolicy as cp
from vtpcm_agent.swtpm.framing import BLOB_FLAG_MIGRATION_ENCRYPTED, BLOB_HEADER

OK = b"\0\0\0\0"


def _blob(flags=BLOB_FLAG_MIGRATION_ENCRYPTED | 0x10, body=b"x" * 40):
    return BLOB_HEADER.pack(2, 1, BLOB_HEADER.size, flags, BLOB_HEADER.size + len(body)) + body


def _set(blob_type, data, flags=0):
    return struct.pack(">IIII", 0x0D, flags, blob_type, len(data)) + data


def _get(blob_type):
    return struct.pack(">IIII", 0x0C, 1, blob_type, 0)


def _req(raw):
    request, used = cp.frame(raw)
    assert request is not None and used == len(raw)
    return request


INIT = struct.pack(">II", 0x02, 1)
STOP = struct.pack(">I", 0x0E)


def _stopped(closed=False):
    """A policy after QEMU's STOP succeeded (what post-load sends first)."""
    policy = cp.Policy(closed=closed)
    assert isinstance(policy.decide(_req(STOP)), cp.Forward)
    policy.on_reply(OK)
    assert policy.stopped
    return policy


def test_framing_takes_qemus_sizes_and_waits_for_the_rest():
    assert cp.frame(b"\0\0") == (None, 0)
    assert cp.frame(struct.pack(">I", 0x05) + b"\2\0\0") == (None, 0)  # 3 of 4 bytes
    request, used = cp.frame(struct.pack(">I", 0x05) + b"\2\0\0\0" + INIT)
    assert (request.op, used) == (cp.Op.SET_LOCALITY, 8)  # the INIT is a request of its own
    header = _set(1, _blob())[:16]
    assert cp.frame(header) == (None, 0)  # the blob follows in a second write
    assert cp.frame(_set(1, _blob()))[0].op is cp.Op.SET_STATEBLOB


def test_an_unknown_command_or_an_oversized_blob_ends_the_connection():
    with pytest.raises(cp.Malformed, match="command 0x00000007 is not one QEMU sends"):
        cp.frame(struct.pack(">I", 0x07) + b"\0" * 8)
    with pytest.raises(cp.Malformed, match="announces 300000 bytes, limit is 262144"):
        cp.frame(struct.pack(">IIII", 0x0D, 0, 1, 300000))


def test_commands_qemu_does_not_use_are_answered_not_forwarded():
    policy = cp.Policy()
    decision = policy.decide(_req(struct.pack(">I", 0x0F)))  # GET_CONFIG
    assert decision == cp.Refuse(b"\0\0\0\x0a", "GET_CONFIG is not forwarded")
    assert policy.refused_count == 0  # not a state refusal


def test_one_encrypted_import_before_the_first_init():
    policy = cp.Policy()
    assert isinstance(policy.decide(_req(struct.pack(">I", 0x0E))), cp.Forward)  # STOP
    policy.on_reply(OK)
    for blob_type in (1, 2):
        assert isinstance(policy.decide(_req(_set(blob_type, _blob()))), cp.Forward)
        assert policy.awaiting()
        policy.on_reply(OK)
        assert not policy.awaiting()
    assert set(policy.set) == {1, 2}
    assert policy.set[1] == cp.blob_seen(1, 0, _blob())
    assert isinstance(policy.decide(_req(INIT)), cp.Forward)
    policy.on_reply(OK)
    assert policy.started
    refusal = policy.decide(_req(_set(2, _blob(body=b"y" * 40))))
    assert refusal == cp.Refuse(b"\0\0\0\x03", "SET_STATEBLOB volatile after the TPM "
                                "started: state is set only before the first INIT (one "
                                "import per swtpm)")
    assert policy.record(7)["refused"] == [refusal.reason]


@pytest.mark.parametrize("raw, reason", [
    (_set(1, _blob(flags=0x10)), "a SET_STATEBLOB permanent that is not "
                                 "migration-encrypted (swtpm 0.7.1 would take it as "
                                 "plaintext)"),
    (_set(2, b""), "an empty SET_STATEBLOB volatile (it would clear a blob set before)"),
    (_set(1, _blob(), flags=4), "SET_STATEBLOB permanent with unknown state flags 0x4"),
    (_set(9, _blob()), "SET_STATEBLOB of unknown blob type 9"),
    (_set(1, b"short"), "SET_STATEBLOB permanent shorter than a blob header"),
])
def test_a_blob_swtpm_would_take_against_the_design_is_refused(raw, reason):
    policy = _stopped()
    assert policy.decide(_req(raw)) == cp.Refuse(b"\0\0\0\x03", reason)
    # and closes the import: a good blob after it is refused too
    assert policy.decide(_req(_set(1, _blob()))).reason == (
        "SET_STATEBLOB permanent after a refused one")
    assert policy.set == {}


def test_a_second_set_of_a_type_and_one_after_swtpm_failed_it_are_refused():
    policy = _stopped()
    policy.decide(_req(_set(1, _blob())))
    policy.on_reply(struct.pack(">I", 0x21))  # swtpm: decryption error
    assert policy.failed == ["swtpm refused SET_STATEBLOB permanent: 0x00000021"]
    assert policy.decide(_req(_set(1, _blob()))).reason == (
        "a second SET_STATEBLOB permanent (one import per swtpm)")


def test_a_read_blob_is_recorded_when_its_reply_is_complete():
    policy = cp.Policy()
    data = _blob(body=b"z" * 100)
    reply = struct.pack(">IIII", 0, 2, len(data), len(data)) + data
    changes = policy.changes
    policy.decide(_req(_get(2)))
    policy.on_reply(reply[:10])
    policy.on_reply(reply[10:50])
    assert policy.got == {} and policy.awaiting()
    policy.on_reply(reply[50:])
    assert policy.got[2] == cp.BlobSeen(2, 2, len(data), hashlib.sha256(data).hexdigest())
    assert policy.changes == changes + 1 and not policy.awaiting()
    # a second read replaces the first and counts as a change
    other = _blob(body=b"w" * 100)
    policy.decide(_req(_get(2)))
    policy.on_reply(struct.pack(">IIII", 0, 2, len(other), len(other)) + other)
    assert policy.got[2].sha256 == hashlib.sha256(other).hexdigest()
    assert policy.changes == changes + 2


def test_a_failed_read_records_nothing_and_a_disconnect_forgets_the_reply():
    policy = cp.Policy()
    policy.decide(_req(_get(3)))
    policy.on_reply(struct.pack(">I", 0x800))
    assert policy.awaiting()  # its 16-byte header is still due (QEMU reads it)
    policy.on_reply(b"\0" * 12)
    assert policy.got == {} and not policy.awaiting()
    policy.decide(_req(_get(1)))
    policy.disconnected()
    assert not policy.awaiting()
    policy.on_reply(b"\0" * 16)  # late bytes of a client that left
    assert policy.got == {}


def test_the_record_holds_digests_never_blobs():
    policy = _stopped()
    secret = _blob(body=b"SECRET-STATE" * 10)
    policy.decide(_req(_set(1, secret)))
    policy.on_reply(OK)
    text = repr(policy.record(5))
    assert b"SECRET" not in text.encode() and "SECRET" not in repr(_req(_set(1, secret)))


def test_a_closed_proxy_lets_no_state_through_even_before_init():
    policy = _stopped(closed=True)
    assert policy.decide(_req(_set(1, _blob()))) == cp.Refuse(
        b"\0\0\0\x03", "SET_STATEBLOB permanent into a swtpm that takes no stream (not an "
        "incoming one waiting for its state)")
    assert policy.record(1)["closed"] is True
    assert isinstance(policy.decide(_req(INIT)), cp.Forward)  # the guest still starts


def test_state_passes_only_after_a_stop_that_succeeded_and_before_init():
    """On a running TPM swtpm 0.7.1 answers SET_STATEBLOB after 4104 bytes
    and reads the rest as commands (review of the proxy, HIGH 1)."""
    policy = cp.Policy()
    assert policy.decide(_req(_set(1, _blob()))).reason == (
        "SET_STATEBLOB permanent without a STOP before it (swtpm would read part of the "
        "blob as commands)")
    policy = cp.Policy()
    policy.decide(_req(STOP))
    policy.on_reply(struct.pack(">I", 0x09))  # the STOP failed
    assert not policy.stopped
    policy = _stopped()
    policy.decide(_req(INIT))
    policy.on_reply(OK)
    assert not policy.stopped and policy.started


def test_a_set_whose_answer_the_client_did_not_wait_for_counts_as_failed():
    """It may have reached swtpm: never unseen (review of the proxy, MEDIUM 3)."""
    policy = _stopped()
    policy.decide(_req(_set(2, _blob())))
    changes = policy.changes
    policy.disconnected()
    assert policy.failed == ["the client left before swtpm answered SET_STATEBLOB volatile"]
    assert policy.changes == changes + 1 and policy.set == {}
    assert policy.decide(_req(_set(2, _blob()))).reason == (
        "a second SET_STATEBLOB volatile (one import per swtpm)")


def test_a_read_at_an_offset_is_not_recorded():
    policy = cp.Policy()
    data = _blob()
    policy.decide(_req(struct.pack(">IIII", 0x0C, 1, 1, 8)))
    reply = struct.pack(">IIII", 0, 2, len(data) - 8, len(data) - 8) + data[8:]
    policy.on_reply(reply[:20])
    assert policy.awaiting()  # its tail is not the next request's reply
    policy.on_reply(reply[20:])
    assert policy.got == {} and not policy.awaiting()


def test_a_stop_counts_on_its_own_connection_only():
    """swtpm's running state is its own: the agent may start the TPM
    between two connections (review round 2, MEDIUM)."""
    policy = _stopped()
    policy.disconnected()
    assert not policy.stopped
    assert policy.decide(_req(_set(1, _blob()))).reason.startswith(
        "SET_STATEBLOB permanent without a STOP before it")


def test_the_proxys_command_line_is_checked():
    from vtpcm_agent.swtpm import ctrlproxy

    args = ctrlproxy.Args(["--listen-fd", "3", "--upstream", "/u", "--swtpm-pid", "9",
                           "--record", "/r", "--run-as", "5", "6", "--closed", "--daemon"])
    assert (args.listen_fd, args.upstream, args.swtpm_pid, str(args.record), args.run_as,
            args.closed, args.daemon) == (3, "/u", 9, "/r", (5, 6), True, True)
    with pytest.raises(ValueError, match="unknown argument '--bogus'"):
        ctrlproxy.Args(["--bogus"])
    with pytest.raises(ValueError, match="--listen-fd, --upstream, --swtpm-pid and --record"):
        ctrlproxy.Args(["--listen-fd", "3"])
    assert ctrlproxy.main(["--listen-fd"]) == 2  # an option without its value

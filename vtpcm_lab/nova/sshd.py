"""An sshd per lab host, so that Nova's libvirt driver can cold-migrate and resize.

Nova 34's ``migrate_disk_and_power_off`` decides whether the instances path
is shared by touching a file on the destination's ``my_ip`` over ssh
(``ssh -o BatchMode=yes <ip> touch ...``), then creates the instance
directory there and copies the disks with ``scp <file> <ip>:<path>``
(``[libvirt] remote_filesystem_transport = ssh``). The lab's hosts are
namespaces of one machine: each gets an sshd of its own, run as root inside
its libvirt daemon's mount and UTS namespaces (so a command lands in that
host's instances directory), listening on that host's ``my_ip`` only and
letting in that host's nova-compute user only, with a key pair the lab
makes under its state dir at every ``up``. Nova's ssh command names neither
user, port nor key: a client drop-in (``/etc/ssh/ssh_config.d``, for the
lab's users and addresses only, removed by ``down``) maps each destination
address to that host's user, port, key and pinned host key.

The text renderers are pure; ``make_keys`` and ``set_login_shell`` touch
the machine.
"""

import dataclasses
import pwd
import subprocess
from collections.abc import Sequence
from pathlib import Path

from vtpcm_lab.exception import LabError

PORT = 2222
CLIENT_DROPIN = Path("/etc/ssh/ssh_config.d/vtpcm-lab-nova.conf")
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
# Nova runs its remote commands through the user's login shell, as sshd does
LOGIN_SHELL = "/bin/sh"
NO_LOGIN = "/usr/sbin/nologin"


@dataclasses.dataclass(frozen=True)
class SshHost:
    """One lab host's sshd: where it listens and whom it lets in."""

    name: str     # the lab host (a, b)
    user: str     # its nova-compute user, the only one let in
    addr: str     # its Nova ``my_ip``
    dir: Path     # root's: config, host key, authorized keys

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"


def client_key(keys_dir: Path, user: str) -> Path:
    """The private key ``user``'s nova-compute logs in with (ssh expands ``%u``)."""
    return keys_dir / user / "id_ed25519"


def sshd_config(host: SshHost, port: int = PORT) -> str:
    """Key login for the host's compute user only, on its address only."""
    return "\n".join([
        "ListenAddress %s:%d" % (host.addr, port),
        "HostKey %s" % host.host_key,
        "PidFile none",
        "AuthorizedKeysFile %s" % host.authorized_keys,
        "AllowUsers %s" % host.user,
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        # PAM's account check lets a system user with a locked password in
        "UsePAM yes",
        # the key files live under /var/tmp (world-writable, sticky)
        "StrictModes no",
        "AllowTcpForwarding no",
        "X11Forwarding no",
        "PrintMotd no",
        # scp speaks SFTP since OpenSSH 9.0
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "",
    ])


def client_dropin(hosts: Sequence[SshHost], keys_dir: Path, known_hosts: Path,
                  port: int = PORT) -> str:
    """ssh_config for the lab's compute users: each host's address reaches its
    sshd as its user, with the local user's key, against the pinned host key."""
    users = ",".join(h.user for h in hosts)
    lines = ["# vtpcm real-Nova lab: written by NovaLab.up, removed by NovaLab.down"]
    for host in hosts:
        lines += [
            "Match localuser %s host %s" % (users, host.addr),
            "    User %s" % host.user,
            "    Port %d" % port,
            "    IdentityFile %s" % client_key(keys_dir, "%u"),
            "    IdentitiesOnly yes",
            "    UserKnownHostsFile %s" % known_hosts,
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    PasswordAuthentication no",
            "    ConnectTimeout 10",
        ]
    return "\n".join(lines) + "\n"


def known_hosts_line(addr: str, public_key: str, port: int = PORT) -> str:
    return "[%s]:%d %s\n" % (addr, port, " ".join(public_key.split()[:2]))


def keygen(path: Path, comment: str, log_file: Path) -> None:
    """A fresh ed25519 key pair at ``path`` (without a passphrase: Nova's
    ``BatchMode=yes`` cannot ask for one)."""
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                               "-f", str(path)], stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, timeout=30, check=False)
    if proc.returncode:
        raise LabError(reason="ssh-keygen for %s failed (%d), see %s"
                              % (comment, proc.returncode, log_file))


def set_login_shell(user: str, shell: str) -> None:
    """Give the compute user a login shell while the lab runs (sshd runs the
    remote command through it), and back to ``nologin`` afterwards."""
    try:
        current = pwd.getpwnam(user).pw_shell
    except KeyError:
        return
    if current == shell:
        return
    proc = subprocess.run(["usermod", "--shell", shell, user], capture_output=True,
                          text=True, timeout=30, check=False)
    if proc.returncode:
        raise LabError(reason="usermod --shell %s %s failed: %s"
                              % (shell, user, proc.stderr.strip()))


def ensure_privsep_dir() -> None:
    """sshd refuses to start without its privilege separation directory."""
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

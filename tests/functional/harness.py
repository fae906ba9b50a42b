"""Test-side names for the daemon helpers (they live in vtpcm_lab.daemons)."""

from vtpcm_lab.daemons import (
    TRANSPORT_URL,
    AgentDaemon,
    Daemon,
    EngineDaemon,
    client_conf,
    short_dir,
    wait_for,
)

__all__ = ["TRANSPORT_URL", "AgentDaemon", "Daemon", "EngineDaemon", "client_conf",
           "short_dir", "wait_for"]

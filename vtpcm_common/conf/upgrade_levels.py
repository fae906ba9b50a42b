"""``[upgrade_levels]``: version caps for a rolling upgrade (as Nova's).

While some services still run the previous release, their clients must not
send calls those services cannot serve. Each option caps one service's RPC
API: a client refuses, before sending, any method introduced after its cap
(``exception.RPCVersionCapped``). Pin during the upgrade, unpin after it
(see the operator guide). The group name is Nova's, so a Nova driver reads
``[upgrade_levels] vtpcm_engine`` from nova.conf next to Nova's own caps.
"""

from typing import Any

from oslo_config import cfg

from vtpcm_common import config

VERSION_RE = r"^([0-9]+\.[0-9]+)?$"

upgrade_levels_group = cfg.OptGroup(
    "upgrade_levels", title="RPC version caps during a rolling upgrade",
    help="Set each option to the RPC API version of the oldest service of that "
         "kind still running while you upgrade, and unset it once all of them run "
         "the new release.")
UPGRADE_LEVELS_OPTS = [
    cfg.StrOpt("vtpcm_agent", regex=VERSION_RE,
               help="Highest vtpcm-agent RPC API version this service sends (the "
                    "engine's calls to the agents). Unset: the newest it knows."),
    cfg.StrOpt("vtpcm_engine", regex=VERSION_RE,
               help="Highest vtpcm-engine RPC API version this service sends (the Nova "
                    "driver's, vtpcm-manage's and the agent's registration calls to "
                    "the engine). Unset: the newest it knows."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    config.register(conf, upgrade_levels_group, UPGRADE_LEVELS_OPTS)


def list_opts() -> list[tuple[cfg.OptGroup, list[Any]]]:
    return [(upgrade_levels_group, UPGRADE_LEVELS_OPTS)]


def version_cap(conf: cfg.ConfigOpts, service: str) -> str | None:
    """The cap for ``service`` ('vtpcm_agent' or 'vtpcm_engine'), None if unset."""
    register_opts(conf)
    value = getattr(conf.upgrade_levels, service)
    return str(value) if value else None

"""Entry point for oslo-config-generator (namespace vtpcm.engine)."""

from oslo_config import cfg

from vtpcm_nova.conf import engine


def list_opts() -> list[tuple[cfg.OptGroup, list[cfg.Opt]]]:
    return engine.list_opts()

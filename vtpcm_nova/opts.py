"""Entry point for oslo-config-generator (namespace vtpcm.engine)."""

from typing import Any

from oslo_config import cfg

from vtpcm_common.conf import upgrade_levels
from vtpcm_nova.conf import engine, novaapi


def list_opts() -> list[tuple[cfg.OptGroup, list[Any]]]:
    return [*engine.list_opts(), *upgrade_levels.list_opts(), *novaapi.list_opts()]

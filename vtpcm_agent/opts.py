"""Entry point for oslo-config-generator (namespace vtpcm.agent)."""

from typing import Any

from oslo_config import cfg

from vtpcm_agent.conf import agent
from vtpcm_common.conf import upgrade_levels


def list_opts() -> list[tuple[cfg.OptGroup | None, list[Any]]]:
    return [*agent.list_opts(), *upgrade_levels.list_opts()]

"""Option registration that keeps separate ConfigOpts objects separate."""

from typing import Any

from oslo_config import cfg


def register(conf: cfg.ConfigOpts, group: cfg.OptGroup, opts: list[Any]) -> None:
    """Register ``opts`` under a fresh copy of ``group`` on ``conf``.

    oslo.config keeps overrides in the OptGroup object, so one module-level
    group registered on several ConfigOpts (tests, the lab and the CLI make
    several in one process) would leak one's set_override into the others."""
    conf.register_group(cfg.OptGroup(group.name, title=group.title, help=group.help))
    conf.register_opts(opts, group=group.name)

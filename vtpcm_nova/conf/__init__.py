"""Configuration of the vtpcm-engine and the Nova-side pieces."""

from oslo_config import cfg

from vtpcm_nova.conf import engine

CONF = cfg.CONF


def register_opts(conf: cfg.ConfigOpts) -> None:
    engine.register_opts(conf)

"""Configuration of the vtpcm-agent: every option lives in a module here."""

from oslo_config import cfg

from vtpcm_agent.conf import agent

CONF = cfg.CONF


def register_opts(conf: cfg.ConfigOpts) -> None:
    agent.register_opts(conf)

"""Overrides on one private ConfigOpts must not leak into another."""

from vtpcm_agent import conf as agent_conf
from vtpcm_common import rpc
from vtpcm_nova import conf as engine_conf


def _conf():
    from oslo_config import cfg
    conf = cfg.ConfigOpts()
    agent_conf.register_opts(conf)
    engine_conf.register_opts(conf)
    conf([], default_config_files=[])
    return conf


def test_overrides_stay_in_their_config():
    first, second = _conf(), _conf()
    first.set_override("agent_topic", "topic-one", group="vtpcm_rpc")
    first.set_override("state_dir", "/one", group="agent")
    first.set_override("connection", "sqlite:///one", group="engine")
    assert rpc.topic(second, "agent_topic") == "vtpcm-agent"
    assert second.agent.state_dir == "/var/lib/vtpcm"
    assert second.engine.connection != "sqlite:///one"
    assert rpc.topic(first, "agent_topic") == "topic-one"

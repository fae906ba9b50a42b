"""vtpcm-agent: the compute-node daemon."""

import faulthandler
import signal
import sys
import threading
from types import FrameType

from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_agent import conf as agent_conf
from vtpcm_agent import service

LOG = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    conf = cfg.CONF
    logging.register_options(conf)
    agent_conf.register_opts(conf)
    conf(sys.argv[1:] if argv is None else argv, project="vtpcm", prog="vtpcm-agent",
         default_config_files=cfg.find_config_files(project="vtpcm", prog="vtpcm-agent"))
    logging.setup(conf, "vtpcm-agent")
    if conf.keystore.host_key_mode == "dev-keyfile":
        LOG.warning("Host key mode dev-keyfile: instance keys are wrapped by a key in a "
                    "plain file. Development only; never use this in production.")
    svc = service.AgentService(conf)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOG.info("Signal %(sig)d received, stopping", {"sig": signum})
        stopping.set()

    # SIGUSR1 dumps every thread's stack to stderr: for a daemon that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    svc.start()
    while not stopping.wait(1.0):
        pass
    svc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

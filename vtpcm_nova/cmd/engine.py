"""vtpcm-engine: the controller service (attestation + migration coordinator)."""

import faulthandler
import signal
import sys
import threading
from types import FrameType

from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_nova import conf as engine_conf
from vtpcm_nova.engine import service

LOG = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    conf = cfg.CONF
    logging.register_options(conf)
    engine_conf.register_opts(conf)
    conf(sys.argv[1:] if argv is None else argv, project="vtpcm", prog="vtpcm-engine",
         default_config_files=cfg.find_config_files(project="vtpcm", prog="vtpcm-engine"))
    logging.setup(conf, "vtpcm-engine")
    svc = service.EngineService(conf)
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

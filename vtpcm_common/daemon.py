"""Run a vTPCM daemon: configuration, logging, signals, start and stop.

SIGTERM/SIGINT stop it cleanly; SIGUSR1 dumps every thread's stack to stderr
(for a daemon that seems stuck).
"""

import faulthandler
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import exception, spans

LOG = logging.getLogger(__name__)


class Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def run(prog: str, register_opts: Callable[[cfg.ConfigOpts], None],
        make_service: Callable[[cfg.ConfigOpts], Service],
        argv: list[str] | None = None) -> int:
    conf = cfg.CONF
    logging.register_options(conf)
    register_opts(conf)
    conf(sys.argv[1:] if argv is None else argv, project="vtpcm", prog=prog,
         default_config_files=cfg.find_config_files(project="vtpcm", prog=prog))
    logging.setup(conf, prog)
    # This logger's DEBUG lines print whole RPC payloads (sealed keys,
    # encrypted state blobs) of late replies: keep it at INFO whatever
    # default_log_levels says.
    logging.getLogger("oslo_messaging._drivers.amqpdriver").logger.setLevel("INFO")
    spans.configure_from_env()  # off unless a benchmark started this daemon
    try:
        service = make_service(conf)
    except exception.VTPCMException as err:
        # a refusal to start (e.g. a database not at the schema's head):
        # one clear line for the operator, not a traceback
        LOG.error("%(prog)s cannot start: %(error)s", {"prog": prog, "error": err})
        return 1
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOG.info("Signal %(sig)d received, stopping", {"sig": signum})
        stopping.set()

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    while not stopping.wait(1.0):
        pass
    service.stop()
    return 0

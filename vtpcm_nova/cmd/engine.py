"""vtpcm-engine: the controller service (attestation + migration coordinator)."""

import sys

from vtpcm_common import daemon
from vtpcm_nova import conf as engine_conf
from vtpcm_nova.engine import service


def main(argv: list[str] | None = None) -> int:
    return daemon.run("vtpcm-engine", engine_conf.register_opts, service.EngineService, argv)


if __name__ == "__main__":
    sys.exit(main())

"""vtpcm-agent: the compute-node daemon."""

import sys

from vtpcm_agent import conf as agent_conf
from vtpcm_agent import service
from vtpcm_common import daemon


def main(argv: list[str] | None = None) -> int:
    return daemon.run("vtpcm-agent", agent_conf.register_opts, service.AgentService, argv)


if __name__ == "__main__":
    sys.exit(main())

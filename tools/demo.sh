#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: installs what is missing, brings
# up the two-host lab (two libvirt session daemons, host-TPM stand-ins, two
# vtpcm-agents, a vtpcm-engine on the local RabbitMQ), boots a VM with a
# vTPCM, live-migrates it A -> B -> A and checks the guest's TPM state.
# Extra arguments go to the demo (--one-way, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
VENV=${VTPCM_VENV:-$PWD/.venv}
exec "$VENV/bin/python" -m vtpcm_lab.demo "$@"

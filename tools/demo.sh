#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: installs what is missing, brings
# up the two-host lab (two libvirt session daemons, host-TPM stand-ins, two
# vtpcm-agents, a vtpcm-engine on the local RabbitMQ), boots a VM with a
# vTPCM, live-migrates it A -> B -> A and checks the guest's TPM state.
# Extra arguments go to the demo (--one-way, --keep).
#
# tools/demo.sh --nova [--hops N] [--keep]: the same story on real Nova 34
# services (placement, glance, api, conductor, scheduler, two nova-computes
# with this driver) through the unmodified `openstack` CLI (~3.5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
VENV=${VTPCM_VENV:-$PWD/.venv}
if [ "${1:-}" = "--nova" ]; then
    shift
    tools/install-nova-services.sh
    exec "$VENV/bin/python" -m vtpcm_lab.nova.demo "$@"
fi
exec "$VENV/bin/python" -m vtpcm_lab.demo "$@"

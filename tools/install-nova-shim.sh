#!/usr/bin/env bash
# Install the nova/virt/vtpcm shim into the Nova of a Python environment, so
# that nova-compute can load compute_driver = vtpcm.VTPCMLibvirtDriver.
# Usage: tools/install-nova-shim.sh [PYTHON]   (default: python3; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
virt_dir=$("$PY" -c 'import os, nova.virt; print(os.path.dirname(nova.virt.__file__))')
install -d -m 0755 "$virt_dir/vtpcm"
install -m 0644 nova_shim/nova/virt/vtpcm/__init__.py "$virt_dir/vtpcm/__init__.py"
"$PY" -c 'from nova.virt.vtpcm import VTPCMLibvirtDriver' 
echo "install-nova-shim: $virt_dir/vtpcm -> vtpcm_nova.virt.driver"

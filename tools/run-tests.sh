#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what is missing,
# then runs lint + type checks, unit, functional (real swtpm, tpm2-pytss,
# RabbitMQ, SQLite and PostgreSQL) and end-to-end tests (the two-host
# libvirt/QEMU lab). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
VENV=${VTPCM_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
echo "== lint"
ruff check vtpcm_common vtpcm_agent vtpcm_nova vtpcm_lab tests
echo "== types"
mypy
echo "== layering"
lint-imports
echo "== tests"
exec python -m pytest -p no:cacheprovider -q --timeout=600 tests "$@"

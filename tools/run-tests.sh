#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what is missing,
# then runs lint + type checks + the layering check, unit, functional (real
# swtpm, tpm2-pytss, RabbitMQ, SQLite and PostgreSQL) and end-to-end tests
# (the two-host libvirt/QEMU lab; real Nova 34 services on it in
# tests/e2e_nova, from their own venv: tools/install-nova-services.sh), then
# the Nova functional tests in their own virtualenv (.venv-nova: Nova 34 and
# its test requirements, pinned in tools/nova-constraints.txt), then every
# benchmark once with tiny sizes (tools/bench.sh --smoke), so that they keep
# working. Extra arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
# the real-Nova lab's services (tests/e2e_nova): Nova 34, placement, glance
tools/install-nova-services.sh
VENV=${VTPCM_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
echo "== lint"
ruff check vtpcm_common vtpcm_agent vtpcm_nova vtpcm_lab tests
python tools/check_test_raises.py tests benchmarks
echo "== types"
mypy
echo "== layering"
lint-imports
echo "== docs (warnings are errors)"
sphinx-build -E -W --keep-going -q -b html doc/source doc/build/html
echo "== tests"
python -m pytest -p no:cacheprovider -q --timeout=600 tests --ignore=tests/nova_functional "$@"
echo "== mutation smoke (agent sealing; fails under 90% of mutants killed; tox -e mutation for all)"
nice -n 19 tools/mutation.sh --smoke
echo "== nova functional (Nova 34's own harness, this driver and filter, real agents)"
tools/install-nova-env.sh
NOVA_VENV=${VTPCM_NOVA_VENV:-$PWD/.venv-nova}
"$NOVA_VENV/bin/python" -m pytest -p no:cacheprovider -q --timeout=600 tests/nova_functional
echo "== benchmarks smoke (tiny sizes: fails if a benchmark crashes, never on its timings)"
tools/bench.sh --smoke

#!/usr/bin/env bash
# Mutation testing of the security core with mutmut (pinned in tox.ini's
# [testenv:mutation]): for each module, mutate only that file and run only
# the fast unit tests that cover it, in a scratch copy of the tree, at the
# lowest CPU priority. Prints one score line per module and writes the
# surviving mutants' diffs to $OUT/<module>.survivors.
# Usage: tools/mutation.sh [MODULE ...]   (default: all; MODULE is a name below)
#        tools/mutation.sh --smoke         (sealing only, fails under its floor)
#        VTPCM_MUTATION_JOBS=1 (parallel children), VTPCM_MUTATION_OUT=dir
# mutmut runs in its own virtualenv, .venv-mutation (built here on first use:
# mutmut pinned below and the project's requirements, NOT the project
# itself, so the mutated copy is what the tests import).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${VTPCM_MUTATION_OUT:-$ROOT/.mutation-out}
JOBS=${VTPCM_MUTATION_JOBS:-1}
MUTMUT_PIN="mutmut==3.8.1"
SMOKE_MODULE=sealing
SMOKE_FLOOR=90  # percent of mutants killed (log statements are not mutated)
mkdir -p "$OUT"

MVENV=${VTPCM_MUTATION_VENV:-$ROOT/.venv-mutation}
stamp="$MVENV/.vtpcm-mutation-$( (echo "$MUTMUT_PIN"; cat setup.cfg) | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    "${PYTHON:-python3}" -m venv "$MVENV"
    reqs=$("${PYTHON:-python3}" - <<'PY'
import configparser
c = configparser.ConfigParser()
c.read("setup.cfg")
print(" ".join(r.strip() for r in c["options"]["install_requires"].splitlines() if r.strip()))
PY
)
    # shellcheck disable=SC2086  # a list of requirements, split on purpose
    "$MVENV/bin/pip" install -q "$MUTMUT_PIN" pytest pytest-timeout $reqs \
        > "$MVENV/pip.log" 2>&1 || { cat "$MVENV/pip.log" >&2; exit 1; }
    touch "$stamp"
fi
export PATH="$MVENV/bin:$PATH"

smoke=0
if [ "${1:-}" = "--smoke" ]; then
    smoke=1
    set -- "$SMOKE_MODULE"
fi

declare -A SRC TESTS
SRC[protocol]=vtpcm_nova/engine/protocol.py
TESTS[protocol]="tests/unit/engine/test_protocol.py tests/unit/engine/test_coordinator.py"
SRC[verifier]=vtpcm_nova/engine/verifier.py
TESTS[verifier]="tests/unit/engine/test_verifier.py"
SRC[sealing]=vtpcm_agent/sealing.py
TESTS[sealing]="tests/unit/agent/test_sealing.py"
SRC[authn]=vtpcm_common/authn.py
TESTS[authn]="tests/unit/test_authn.py tests/unit/common/test_signed_replies.py tests/unit/common/test_reply_envelope.py"
SRC[association]=vtpcm_agent/association.py
TESTS[association]="tests/unit/agent/test_association.py"
SRC[keystore]=vtpcm_agent/keystore.py
# the TPM-sealed host key needs a TPM: its functional test (a swtpm host TPM, ~1 s)
TESTS[keystore]="tests/unit/agent/test_keystore.py tests/functional/agent/test_keystore_tpm.py"
ALL=(protocol verifier sealing authn association keystore)

modules=("$@")
((${#modules[@]})) || modules=("${ALL[@]}")
for mod in "${modules[@]}"; do
    [ -n "${SRC[$mod]:-}" ] || { echo "mutation: unknown module $mod (one of ${ALL[*]})" >&2; exit 2; }
    work=$(mktemp -d "${TMPDIR:-/tmp}/vtpcm-mutation-$mod.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    cp -r vtpcm_common vtpcm_agent vtpcm_nova vtpcm_lab tests setup.cfg pyproject.toml "$work/"
    {
        echo
        echo "[tool.mutmut]"
        echo "source_paths = [\"vtpcm_common\", \"vtpcm_agent\", \"vtpcm_nova\"]"
        echo "only_mutate = [\"${SRC[$mod]}\"]"
        echo 'also_copy = ["vtpcm_lab"]  # the functional fixtures start a host TPM stand-in'
        printf 'pytest_add_cli_args_test_selection = ['
        # shellcheck disable=SC2086  # a list of paths, split on purpose
        printf '"%s", ' ${TESTS[$mod]}
        echo ']'
        echo 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]'
        # Log statements are not mutated: their wording is not behaviour, and
        # what must never be in them (keys, state) is the leak scans' job.
        echo "do_not_mutate_patterns = ['^\\s*LOG\\.(debug|info|warning|error|exception)\\(']"
    } >> "$work/pyproject.toml"
    (cd "$work" && nice -n 19 mutmut run --max-children "$JOBS" > "$OUT/$mod.log" 2>&1) || {
        tail -20 "$OUT/$mod.log" >&2; echo "mutation: mutmut failed for $mod" >&2; exit 1; }
    (cd "$work" && mutmut results --all true > "$OUT/$mod.results" 2>&1)
    : > "$OUT/$mod.survivors"
    awk -F: '/: survived$/ {print $1}' "$OUT/$mod.results" | while read -r name; do
        (cd "$work" && mutmut show "$name") >> "$OUT/$mod.survivors" 2>&1
    done
    score=$(python3 - "$mod" "$OUT/$mod.results" <<'PY'
import collections, sys
mod, path = sys.argv[1], sys.argv[2]
counts = collections.Counter(line.rsplit(":", 1)[1].strip()
                             for line in open(path) if ":" in line)
total = sum(counts.values())
killed = counts["killed"] + counts["timeout"]
print("mutation %-12s %4d mutants: %s; killed %.1f%%" % (
    mod, total, ", ".join("%s %d" % kv for kv in sorted(counts.items())),
    100.0 * killed / total if total else 0.0))
PY
)
    echo "$score"
    if ((smoke)); then
        pct=$(sed -n 's/.*killed \([0-9]*\)\.[0-9]*%$/\1/p' <<<"$score")
        ((pct >= SMOKE_FLOOR)) || { echo "mutation: $mod killed ${pct}% < ${SMOKE_FLOOR}%;" \
            "surviving mutants in $OUT/$mod.survivors" >&2; exit 1; }
    fi
    rm -rf "$work"
    trap - EXIT
done
